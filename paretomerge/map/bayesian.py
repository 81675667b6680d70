"""Bayesian MAP (the MAP paper's Algorithm 3): spend the evaluation budget where the surrogates are least sure.

After each round the surrogates are refitted; the evaluated directions are binned by their hyperspherical angles
over ``[0, π/2]``; each bin is scored by its mean squared surrogate error plus half the bootstrap standard
deviation of that mean (drop 20%, 30 resamples); the next round's points come from bins drawn with probability
``softmax(score / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paretomerge.map.evaluate import MergeEvaluator, surrogate_kind
from paretomerge.map.sampling import check_bounds, initial_samples
from paretomerge.map.surrogate import QuadraticSurrogate


def angular_bins(c: np.ndarray, bins_per_angle: int = 4) -> np.ndarray:
    """``[n]`` bin index of each direction of ``c [n, K]`` (non-negative): the K−1 hyperspherical angles
    ``φ_i = arccos(c_i / ‖c_{i:}‖)`` (i < K−1) and ``φ_{K−1} = atan2(c_K, c_{K−1})``, each in ``[0, π/2]``, cut
    into ``bins_per_angle`` equal bins (π/2 itself falls in the last one). The paper's printed recursion
    divides by ``sin φ`` once more than the standard coordinates do; these are the standard ones. A zero tail
    gives angle 0."""
    if isinstance(bins_per_angle, bool) or not isinstance(bins_per_angle, int) or bins_per_angle < 1:
        raise ValueError(f"bins_per_angle must be a positive int, got {bins_per_angle!r}")
    c = np.clip(np.atleast_2d(np.asarray(c, dtype=np.float64)), 0.0, None)
    n, k = c.shape
    angles = np.zeros((n, k - 1))
    tail = np.sqrt(np.cumsum(c[:, ::-1] ** 2, axis=1)[:, ::-1])  # ‖c_{i:}‖
    for i in range(k - 2):
        with np.errstate(invalid="ignore", divide="ignore"):
            angles[:, i] = np.where(tail[:, i] > 0, np.arccos(np.clip(c[:, i] / tail[:, i], -1, 1)), 0.0)
    angles[:, k - 2] = np.arctan2(c[:, k - 1], c[:, k - 2])
    width = (np.pi / 2) / bins_per_angle
    per_angle = np.minimum((angles / width).astype(int), bins_per_angle - 1)
    return np.ravel_multi_index(per_angle.T, (bins_per_angle,) * (k - 1))


@dataclass
class BinScore:
    mean: float   # mean squared surrogate error of the bin's points
    std: float    # std of that mean over bootstrap resamples that each drop 20% of the points
    score: float  # mean + std / 2


def bin_scores(errors: np.ndarray, bins: np.ndarray, drop: float = 0.2, resamples: int = 30,
               seed: int = 0) -> dict[int, BinScore]:
    """Score each occupied bin (Algorithm 3): ``mean + ½·std`` of the bootstrap means."""
    rng = np.random.default_rng(seed)
    scores = {}
    for b in np.unique(bins):
        e = np.asarray(errors, dtype=np.float64)[bins == b]
        keep = len(e) - int(np.floor(drop * len(e)))
        means = [rng.choice(e, size=keep, replace=False).mean() for _ in range(resamples)]
        std = float(np.std(means))
        scores[int(b)] = BinScore(float(e.mean()), std, float(e.mean()) + 0.5 * std)
    return scores


@dataclass
class BayesianResult:
    c: np.ndarray                         # [n, K] every evaluated scaling vector
    metrics: np.ndarray                   # [n, K] their real metrics
    surrogates: list[QuadraticSurrogate]  # fitted on all of them
    evaluations: int


def bayesian_map(evaluator: MergeEvaluator, initial: int, per_round: int, rounds: int, bins_per_angle: int = 4,
                 temperature: float = 1.0, kind: str | None = None, low: float | None = None,
                 high: float | None = None, bounds: Sequence[float] = (0.0, 1.0), seed: int = 0) -> BayesianResult:
    """Algorithm 3: ``initial`` points (the one-hots and uniform ones), then ``rounds`` rounds of ``per_round``
    points drawn from bins by their scores. Bins that hold no point yet get the highest score seen. The surrogate's
    case defaults to the evaluator's score's (`surrogate_kind`)."""
    if kind is None:
        kind, low, high = surrogate_kind(evaluator.score)
    lo, hi = check_bounds(bounds)
    for name, value, least in (("initial", initial, 1), ("per_round", per_round, 1), ("rounds", rounds, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    num_tasks = evaluator.tv.num_tasks
    start = evaluator.count
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_tasks, 3]))
    c = initial_samples(num_tasks, budget=initial, seed=seed, bounds=bounds)
    metrics = evaluator(c)
    surrogates = _fit(c, metrics, kind, low, high)
    all_bins = np.arange(bins_per_angle ** (num_tasks - 1))
    for r in range(rounds):
        predicted = np.stack([s.predict(c) for s in surrogates], axis=1)
        errors = ((predicted - metrics) ** 2).sum(1)
        scores = bin_scores(errors, angular_bins(c, bins_per_angle), seed=seed + r)
        best = max(s.score for s in scores.values())
        logits = np.array([scores[b].score if b in scores else best for b in all_bins]) / temperature
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        chosen = rng.choice(all_bins, size=per_round, p=prob)
        new = np.stack([_draw_in_bin(int(b), num_tasks, bins_per_angle, lo, hi, rng) for b in chosen])
        c = np.concatenate([c, new])
        metrics = np.concatenate([metrics, evaluator(new)])
        surrogates = _fit(c, metrics, kind, low, high)
    return BayesianResult(c, metrics, surrogates, evaluator.count - start)


def _fit(c: np.ndarray, metrics: np.ndarray, kind: str, low: float | None,
         high: float | None) -> list[QuadraticSurrogate]:
    return [QuadraticSurrogate(kind, low, high).fit(c, metrics[:, k]) for k in range(metrics.shape[1])]


def _draw_in_bin(b: int, num_tasks: int, bins_per_angle: int, lo: float, hi: float, rng: np.random.Generator,
                 tries: int = 10_000) -> np.ndarray:
    """A uniform point of ``[lo, hi]^K`` whose direction falls in bin ``b`` (rejection sampling)."""
    for _ in range(tries // 100):
        candidates = rng.uniform(max(lo, 0.0), hi, size=(100, num_tasks))
        hits = candidates[angular_bins(candidates, bins_per_angle) == b]
        if len(hits):
            return hits[0]
    return rng.uniform(lo, hi, size=num_tasks)  # an (almost) empty sector: fall back to uniform
