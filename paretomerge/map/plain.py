"""Plain MAP (the MAP paper's Algorithm 1): evaluate the budget, fit one surrogate per task, report held-out R²,
refit on every point, and search the surrogates with NSGA-III."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paretomerge.map.evaluate import MergeEvaluator, surrogate_kind
from paretomerge.map.sampling import initial_samples
from paretomerge.map.search import nsga3_front
from paretomerge.map.surrogate import QuadraticSurrogate, num_quadratic_parameters


@dataclass
class MAPResult:
    c: np.ndarray                         # [n, K] evaluated scaling vectors
    metrics: np.ndarray                   # [n, K] their real metrics
    surrogates: list[QuadraticSurrogate]  # fitted on every evaluated point
    r2: np.ndarray                        # [K] held-out R² of surrogates fitted without the held-out points
    front_c: np.ndarray                   # [P, K] the predicted Pareto set
    front_predicted: np.ndarray           # [P, K] the surrogates' metrics there
    evaluations: int


def fit_surrogates(c: np.ndarray, metrics: np.ndarray, kind: str = "bounded", low: float | None = 0.0,
                   high: float | None = 1.0) -> list[QuadraticSurrogate]:
    return [QuadraticSurrogate(kind, low, high).fit(c, metrics[:, k]) for k in range(metrics.shape[1])]


def plain_map(evaluator: MergeEvaluator, budget: int | None = None, holdout: float = 0.2, kind: str | None = None,
              low: float | None = None, high: float | None = None, bounds: Sequence[float] = (0.0, 1.0),
              seed: int = 0, pop_size: int = 100, generations: int = 300) -> MAPResult:
    """Algorithm 1 with ``budget`` real evaluations of each task (default: the paper's budget for K).

    The last ``holdout`` share of the uniform points is held out to measure R²; the one-hots are always fitted.
    ``kind``, ``low`` and ``high`` (the surrogate's case) default to the evaluator's score's (`surrogate_kind`), and
    the search maximises an accuracy and minimises a loss.
    """
    if kind is None:
        kind, low, high = surrogate_kind(evaluator.score)
    num_tasks = evaluator.tv.num_tasks
    start = evaluator.count
    c = initial_samples(num_tasks, budget=budget, seed=seed, bounds=bounds)
    needed = num_quadratic_parameters(num_tasks)
    held = int(round(holdout * (len(c) - num_tasks)))
    if len(c) - held < needed:
        raise ValueError(f"a budget of {len(c)} points leaves {len(c) - held} to fit after holding out {held}, "
                         f"fewer than the {needed} parameters of a quadratic surrogate for K={num_tasks}")
    metrics = evaluator(c)
    fit_part = slice(0, len(c) - held)
    r2 = np.full(num_tasks, np.nan)
    if held >= 2:
        partial = fit_surrogates(c[fit_part], metrics[fit_part], kind, low, high)
        r2 = np.array([s.r2(c[len(c) - held:], metrics[len(c) - held:, k]) for k, s in enumerate(partial)])
    surrogates = fit_surrogates(c, metrics, kind, low, high)
    front_c, front_predicted = nsga3_front(surrogates, bounds=bounds, pop_size=pop_size, generations=generations,
                                          seed=seed, higher_is_better=evaluator.score.higher_is_better)
    return MAPResult(c, metrics, surrogates, r2, front_c, front_predicted, evaluator.count - start)
