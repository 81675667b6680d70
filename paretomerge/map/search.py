"""NSGA-III on the surrogates (pymoo), and choosing the front member for a preference (SPEC §6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.problem import Problem
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from paretomerge.map.sampling import check_bounds
from paretomerge.map.surrogate import QuadraticSurrogate
from paretomerge.preferences import validate_preference


class SurrogateProblem(Problem):
    """Optimise every task's surrogate over ``c ∈ [low, high]^K``, vectorised: maximise an accuracy (pymoo minimises
    ``−M̃``), minimise a loss (``higher_is_better=False``)."""

    def __init__(self, surrogates: Sequence[QuadraticSurrogate], bounds: Sequence[float] = (0.0, 1.0),
                 higher_is_better: bool = True) -> None:
        low, high = check_bounds(bounds)
        self.surrogates, self.sign = list(surrogates), 1.0 if higher_is_better else -1.0
        k = len(self.surrogates)
        super().__init__(n_var=k, n_obj=k, xl=np.full(k, low), xu=np.full(k, high))

    def _evaluate(self, x: np.ndarray, out: dict, *args, **kwargs) -> None:
        out["F"] = -self.sign * np.stack([s.predict(x) for s in self.surrogates], axis=1)


def nsga3_front(surrogates: Sequence[QuadraticSurrogate], bounds: Sequence[float] = (0.0, 1.0),
                pop_size: int = 100, generations: int = 300, partitions: int | None = None,
                seed: int = 0, higher_is_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The predicted Pareto front: ``(c [P, K], M̃(c) [P, K])``, non-dominated under the surrogates (maximised, or
    minimised where ``higher_is_better`` is False: a loss).

    Reference directions are pymoo's Das-Dennis with ``partitions`` (default 12 for K = 2, then fewer as K grows);
    the population is at least the number of directions.
    """
    k = len(surrogates)
    if partitions is None:
        partitions = {2: 12, 3: 12, 4: 8, 5: 6}.get(k, 4)
    directions = get_reference_directions("das-dennis", k, n_partitions=partitions)
    pop_size = max(pop_size, len(directions))
    problem = SurrogateProblem(surrogates, bounds, higher_is_better)
    result = minimize(problem, NSGA3(ref_dirs=directions, pop_size=pop_size), ("n_gen", generations), seed=seed,
                      verbose=False)
    c = np.atleast_2d(result.X)
    return c, -problem.sign * np.atleast_2d(result.F)


def choose_for_preference(front_c: np.ndarray, front_values: np.ndarray, preference: Sequence[float],
                          higher_is_better: bool = True) -> tuple[np.ndarray, int]:
    """The front member maximising ``p̂ᵀM̃(c)`` with ``p̂ = p/‖p‖`` (minimising it for a loss): ``(c [K], its row
    index)``."""
    p = validate_preference(preference, front_values.shape[1]).double().numpy()
    weighted = front_values @ (p / np.linalg.norm(p))
    index = int(np.argmax(weighted) if higher_is_better else np.argmin(weighted))
    return front_c[index], index
