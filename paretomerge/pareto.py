"""Front metrics (SPEC §4, §3c), all from pymoo and moocore: non-dominated filtering, hypervolume (exact, or
approximate beyond `EXACT_HV_MAX_TASKS` tasks, with its error), GD/IGD, win rate.

A front is a matrix ``[P, K]`` of per-task scores: one row per evaluated model (preference), one column per task. A
`Score` says what the numbers are and which way is better: `ACCURACY` (fractions, higher is better) or `LOSS`
(nats per token, lower is better). pymoo minimises, so it sees ``-accuracy`` or the loss itself.

The hypervolume is taken on each task's *gain* over a reference point: ``accuracy − reference`` (reference 0 unless
said), or ``reference − loss`` (the reference is required for a loss: the pretrained model's per-task loss in every
caller here), so a point worse than the reference on a task adds no volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np
import torch
from pymoo.indicators.gd import GD
from pymoo.indicators.hv import HV
from pymoo.indicators.igd import IGD
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

Values = Sequence[Sequence[float]] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Score:
    """What a suite's ``evaluate`` returns per task: its ``name``, its direction, and how it is shown (``percent``:
    fractions shown ×100 with ``unit`` "%"; ``perplexity``: a next-token loss that summary tables print as its
    perplexity, exp(loss))."""

    name: str
    higher_is_better: bool
    unit: str
    percent: bool = False
    perplexity: bool = False

    @property
    def sign(self) -> float:
        """+1 where higher is better, −1 where lower is: ``sign · value`` is always to be maximised."""
        return 1.0 if self.higher_is_better else -1.0

    def shown(self, values: Values | float) -> np.ndarray:
        """Values as tables and figures show them (accuracy in %, a loss as it is)."""
        values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        return 100.0 * values if self.percent else values

    def tabulated(self, values: Values | float) -> np.ndarray:
        """Values as summary tables print them: accuracy in %, a next-token loss as its perplexity."""
        return np.exp(self.shown(values)) if self.perplexity else self.shown(values)

    @property
    def tabulated_name(self) -> str:
        """What `tabulated` values are: ``accuracy (%)`` or ``perplexity``."""
        return "perplexity" if self.perplexity else f"{self.name} ({self.unit})"

    def label(self, task: str | None = None) -> str:
        """An axis label: ``"digit accuracy (%)"``, ``"fr loss (nats/token)"``."""
        return f"{task + ' ' if task else ''}{self.name} ({self.unit})"

    def gains(self, values: Values, reference: Sequence[float] | np.ndarray | float | None = None) -> np.ndarray:
        """``sign · (values − reference)`` per task: how much better than the reference each point is (negative where
        worse). The reference defaults to 0 for a score where higher is better and is required otherwise."""
        values = _matrix(values, self)
        if reference is None:
            if not self.higher_is_better:
                raise ValueError(f"a {self.name} front needs a reference point (e.g. the pretrained model's per-task "
                                 f"{self.name}): lower is better, so there is no natural zero")
            reference = 0.0
        reference = np.broadcast_to(np.asarray(reference, dtype=np.float64), (values.shape[1],))
        if not np.isfinite(reference).all():
            raise ValueError(f"the reference point must be finite, got {reference.tolist()}")
        return self.sign * (values - reference)

    def better(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Elementwise: whether ``a`` is strictly better than ``b``."""
        return self.sign * np.asarray(a, dtype=np.float64) > self.sign * np.asarray(b, dtype=np.float64)


ACCURACY = Score("accuracy", higher_is_better=True, unit="%", percent=True)
LOSS = Score("loss", higher_is_better=False, unit="nats/token", perplexity=True)
SCORES = {score.name: score for score in (ACCURACY, LOSS)}


def score_of(datamodule: object) -> Score:
    """The score a suite's ``evaluate`` returns: its ``score`` attribute, accuracy where it declares none."""
    score = getattr(datamodule, "score", ACCURACY)
    if not isinstance(score, Score):
        raise TypeError(f"{type(datamodule).__name__}.score must be a paretomerge.pareto.Score, got {score!r}")
    return score


def _matrix(values: Values, score: Score = ACCURACY) -> np.ndarray:
    acc = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    acc = acc.astype(np.float64)
    front = f"{'an' if score.name[0] in 'aeiou' else 'a'} {score.name} front"
    if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 2:
        raise ValueError(f"{front} must be [P >= 1, K >= 2], got shape {acc.shape}")
    if not np.isfinite(acc).all():
        raise ValueError(f"{front} must hold finite values")
    if score.percent and (acc < 0).any():
        raise ValueError(f"{front} must hold non-negative values")
    return acc


def _minimised(values: Values, score: Score) -> np.ndarray:
    """What pymoo minimises: ``−accuracy``, or the loss."""
    return -score.sign * _matrix(values, score)


def non_dominated(values: Values, score: Score = ACCURACY) -> np.ndarray:
    """Row indices of the non-dominated points of ``[P, K]`` scores."""
    return np.sort(NonDominatedSorting().do(_minimised(values, score), only_non_dominated_front=True))


#: Exact hypervolume (pymoo's HV) up to this many tasks; beyond, `moocore.hv_approx`. Exact HV took 0.03 / 0.2 / 3.0 s
#: on 30 points at 10 / 12 / 14 tasks, and 0.7 / 8.9 s on 50 points at 10 / 12; the approximation 0.2-0.4 s from 4 to
#: 20 tasks, within 0.21% of the exact value at 6 to 8 (benchmarks/bench_hypervolume.py).
EXACT_HV_MAX_TASKS = 10
#: The approximation: the mean of `HV_APPROX_RUNS` seeded Monte-Carlo estimates (moocore's ``DZ2019-MC``, each of
#: `HV_APPROX_SAMPLES` directions); its stated error is three standard errors of that mean. On 30-point fronts at 6
#: to 10 tasks that interval missed the exact value on 3 of 240 draws; a Student-t 95% one missed on 7 to 10% (the
#: estimator's small bias, about 0.03%, is in it).
HV_APPROX_RUNS, HV_APPROX_SAMPLES = 16, 2**16


@dataclass(frozen=True)
class HypervolumeValue:
    """A hypervolume and how it was computed: ``method`` "exact" or "approximate"; ``error``, for an approximation,
    three standard errors of its Monte-Carlo mean (`HV_APPROX_RUNS`), 0 when exact."""

    value: float
    method: str
    error: float = 0.0

    def describe(self) -> str:
        """What is printed beside the number: ``exact`` or ``approximate ± error (3 standard errors, ...)``."""
        if self.method == "exact":
            return "exact"
        return (f"approximate ± {self.error:.2g} (3 standard errors of {HV_APPROX_RUNS} moocore.hv_approx Monte-Carlo "
                f"runs of {HV_APPROX_SAMPLES} directions)")


def measure_hypervolume(values: Values, scale: Sequence[float] | np.ndarray | None = None, score: Score = ACCURACY,
                        reference: Sequence[float] | np.ndarray | None = None, method: str = "auto",
                        seed: int = 0) -> HypervolumeValue:
    """Hypervolume of the per-task gains over ``reference`` (`Score.gains`: accuracy − 0 by default; for a loss,
    reference − loss, with ``reference [K]`` required), under maximisation with the reference point at 0.

    scale: optional per-task divisor of the gains ``[K]`` (e.g. the individual models' own gains, `individual_gains`,
    for the normalised HV). Dominated points, and points worse than the reference, add nothing, so all rows may be
    passed. method: ``"exact"``, ``"approximate"`` or ``"auto"`` (exact up to `EXACT_HV_MAX_TASKS` tasks); an
    approximation is seeded by ``seed``, so the same front gives the same value.
    """
    if method not in ("auto", "exact", "approximate"):
        raise ValueError(f"method must be 'auto', 'exact' or 'approximate', got {method!r}")
    gains = np.clip(score.gains(values, reference), 0.0, None)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != (gains.shape[1],) or not (scale > 0).all():
            raise ValueError(f"scale must be [K={gains.shape[1]}] positive values, got {scale!r}")
        gains = gains / scale
    tasks = gains.shape[1]
    if method == "exact" or (method == "auto" and tasks <= EXACT_HV_MAX_TASKS):
        return HypervolumeValue(float(HV(ref_point=np.zeros(tasks))(-gains)), "exact")
    kept = gains[(gains > 0).all(axis=1)]  # a point with no gain on some task adds no volume
    if len(kept) == 0:
        return HypervolumeValue(0.0, "approximate", 0.0)
    runs = np.array([moocore.hv_approx(-kept, ref=np.zeros(tasks), nsamples=HV_APPROX_SAMPLES, method="DZ2019-MC",
                                       seed=seed * HV_APPROX_RUNS + run) for run in range(HV_APPROX_RUNS)])
    return HypervolumeValue(float(runs.mean()), "approximate", float(3 * runs.std(ddof=1) / np.sqrt(len(runs))))


def hypervolume(values: Values, scale: Sequence[float] | np.ndarray | None = None, score: Score = ACCURACY,
                reference: Sequence[float] | np.ndarray | None = None) -> float:
    """`measure_hypervolume`'s value (exact up to `EXACT_HV_MAX_TASKS` tasks, approximate beyond)."""
    return measure_hypervolume(values, scale, score, reference).value


def individual_gains(individual: Sequence[float] | np.ndarray, score: Score = ACCURACY,
                     reference: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """``[K]``: each individual model's gain over the reference on its own task, the normalised hypervolume's scale
    (the individual accuracy itself for accuracy with reference 0)."""
    return score.gains(np.asarray(individual, dtype=np.float64).reshape(1, -1), reference)[0]


def preference_weighted_sum(values: Values, preferences: Values, score: Score = ACCURACY) -> np.ndarray:
    """``[P]``: ``Σ_k p_k · value[p, k]`` for each preference row (MAP Table 4), preferences normalised to sum 1.

    values: ``[P, K]``, row p the scores of the model a method gives for preference p (a single-model method repeats
    its one row). preferences: ``[P, K]``, non-negative with positive row sums. Higher is better for accuracy, lower
    for a loss.
    """
    acc = _matrix(values, score)
    prefs = np.asarray(preferences.detach().cpu() if isinstance(preferences, torch.Tensor) else preferences,
                       dtype=np.float64)
    if prefs.shape != acc.shape:
        raise ValueError(f"preferences {prefs.shape} and scores {acc.shape} must both be [P, K]")
    if not np.isfinite(prefs).all() or (prefs < 0).any() or not (prefs.sum(1) > 0).all():
        raise ValueError("preferences must be finite, non-negative, with a positive sum per row")
    return (prefs / prefs.sum(1, keepdims=True) * acc).sum(1)


def _against_reference(indicator: type, values: Values, reference: Values, score: Score) -> float:
    front, ref = _minimised(values, score), _minimised(reference, score)
    if front.shape[1] != ref.shape[1]:
        raise ValueError(f"front and reference must have the same K, got {front.shape[1]} and {ref.shape[1]}")
    return float(indicator(ref)(front))


def generational_distance(values: Values, reference: Values, score: Score = ACCURACY) -> float:
    """GD of the front ``[P, K]`` to a reference front ``[Q, K]`` (e.g. a dense grid search): the mean distance from
    each point to its nearest reference point (pymoo ``GD``), in the score's units."""
    return _against_reference(GD, values, reference, score)


def inverted_generational_distance(values: Values, reference: Values, score: Score = ACCURACY) -> float:
    """IGD: the mean distance from each reference point to its nearest front point (pymoo ``IGD``)."""
    return _against_reference(IGD, values, reference, score)


def win_rate(values_a: Values, values_b: Values, score: Score = ACCURACY) -> float:
    """MAP paper §4.1: the share of (point of A, point of B, task) triples where A's score is better,
    ``(1/(P·Q·K)) Σ_i Σ_j Σ_k 1[A[i,k] better than B[j,k]]`` (SPEC §4 writes P² for fronts of equal size)."""
    a, b = _matrix(values_a, score), _matrix(values_b, score)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fronts must have the same K, got {a.shape[1]} and {b.shape[1]}")
    return float(score.better(a[:, None, :], b[None, :, :]).mean())


def front_spread(values: Values, score: Score = ACCURACY) -> float:
    """Diversity of a front: the mean over tasks of the range (max − min) of the non-dominated points' scores.

    0 when the front is a single point (every preference gives the same trade-off); in the score's units.
    """
    acc = _matrix(values, score)
    front = acc[non_dominated(acc, score)]
    return float((front.max(0) - front.min(0)).mean())
