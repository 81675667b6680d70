"""Nested-merging MAP (the MAP paper's Algorithm 2): for one preference, repeatedly merge the two groups of tasks
whose metrics are closest, choosing the pair's scaling by 2-task MAP, until one model remains. It needs
``O(K log K)`` real evaluations instead of plain MAP's budget, but gives one model, not a front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from paretomerge.kernels import MergedModel, TaskVectors, materialize
from paretomerge.map.evaluate import MergeEvaluator, surrogate_kind
from paretomerge.map.sampling import initial_samples
from paretomerge.map.search import choose_for_preference, nsga3_front
from paretomerge.map.surrogate import QuadraticSurrogate, num_quadratic_parameters
from paretomerge.preferences import validate_preference
from paretomerge.static import task_wise


@dataclass
class _Group:
    tasks: list[str]
    weights: np.ndarray  # [K] task-wise coefficients of the group's merged model
    metric: float        # preference-weighted metric of the group's tasks


@dataclass
class NestedResult:
    coefficients: np.ndarray       # [K]: the merged model is θ0 + Σ_k c_k τ_k
    evaluations: int               # real (model, task) evaluations spent
    merges: list[tuple[list[str], list[str], tuple[float, float]]] = field(default_factory=list)

    def model(self, task_vectors: TaskVectors) -> MergedModel:
        """The merged model θ0 + Σ_k c_k τ_k (through ``kernels.merge``), as a plain eval-mode module."""
        return materialize(task_vectors, task_wise(task_vectors, self.coefficients))


def nested_map(evaluator: MergeEvaluator, preference: Sequence[float], points_per_pair: int = 20,
               kind: str | None = None, low: float | None = None, high: float | None = None,
               bounds: Sequence[float] = (0.0, 1.0), seed: int = 0, generations: int = 300) -> NestedResult:
    """Algorithm 2 on the evaluator's metric (``kind``, ``low``, ``high`` as in `QuadraticSurrogate`, by default its
    score's case, `surrogate_kind`; a loss is minimised).

    Each task starts as its own group (its fine-tuned model, evaluated once). Each round takes the two groups
    with the closest metrics, evaluates ``points_per_pair`` pair scalings (c_i, c_j) of their merged models on
    their tasks, fits a 2-task surrogate per group (the group's metric: its tasks' accuracies weighted by the
    normalised preference), runs NSGA-III, and keeps the front member that the pair's preference picks.
    """
    if kind is None:
        kind, low, high = surrogate_kind(evaluator.score)
    names = list(evaluator.tv.task_names)
    p = validate_preference(preference, len(names)).double().numpy()
    if points_per_pair < num_quadratic_parameters(2):
        raise ValueError(f"points_per_pair={points_per_pair} cannot fit a 2-task quadratic surrogate with "
                         f"{num_quadratic_parameters(2)} parameters")
    start = evaluator.count
    index = {t: k for k, t in enumerate(names)}
    one_hots = np.eye(len(names))
    groups = [_Group([t], one_hots[k], float(evaluator(one_hots[k], tasks=[t])[0, k])) for k, t in enumerate(names)]

    merges = []
    pair_seed = seed
    while len(groups) > 1:
        # One round: pair the groups greedily by closest metrics (the paper's rule), merge every pair; an odd group
        # waits for the next round. Rounds halve the groups, so the evaluations stay O(K log K).
        waiting, merged_this_round = list(groups), []
        while len(waiting) > 1:
            i, j = min(((a, b) for a in range(len(waiting)) for b in range(a + 1, len(waiting))),
                       key=lambda ab: abs(waiting[ab[0]].metric - waiting[ab[1]].metric))
            gi, gj = waiting[i], waiting[j]
            waiting = [g for k, g in enumerate(waiting) if k not in (i, j)]
            merged, choice = _merge_pair(evaluator, gi, gj, p, index, points_per_pair, kind, low, high, bounds,
                                         pair_seed, generations)
            merges.append((gi.tasks, gj.tasks, choice))
            merged_this_round.append(merged)
            pair_seed += 1
        groups = merged_this_round + waiting
    return NestedResult(groups[0].weights, evaluator.count - start, merges)


def _merge_pair(evaluator: MergeEvaluator, gi: _Group, gj: _Group, p: np.ndarray, index: dict[str, int],
                points_per_pair: int, kind: str, low: float | None, high: float | None, bounds: Sequence[float],
                seed: int, generations: int) -> tuple[_Group, tuple[float, float]]:
    """2-task MAP between two groups' merged models: ``θ0 + c_i w_i·τ + c_j w_j·τ``."""

    def group_metric(scores: np.ndarray, tasks: list[str]) -> np.ndarray:
        columns = [index[t] for t in tasks]
        w = p[columns] + 1e-12
        return scores[:, columns] @ (w / w.sum())

    pairs = initial_samples(2, budget=points_per_pair, seed=seed, bounds=bounds)
    coefficients = pairs[:, :1] * gi.weights + pairs[:, 1:] * gj.weights
    scores = evaluator(coefficients, tasks=gi.tasks + gj.tasks)
    surrogates = [QuadraticSurrogate(kind, low, high).fit(pairs, group_metric(scores, g.tasks)) for g in (gi, gj)]
    higher = evaluator.score.higher_is_better
    front_c, front_values = nsga3_front(surrogates, bounds=bounds, generations=generations, seed=seed,
                                        higher_is_better=higher)
    # Groups the user gives no weight to still need a merge: both at zero weight count equally.
    pair_pref = [p[[index[t] for t in g.tasks]].sum() + 1e-12 for g in (gi, gj)]
    (ci, cj), row = choose_for_preference(front_c, front_values, pair_pref, higher)
    metric = float(np.dot(pair_pref, front_values[row]) / sum(pair_pref))
    return _Group(gi.tasks + gj.tasks, ci * gi.weights + cj * gj.weights, metric), (float(ci), float(cj))
