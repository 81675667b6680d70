"""Front metrics (SPEC §4), all from pymoo: non-dominated filtering and hypervolume of accuracy fronts.

Accuracy matrices are ``Acc [P, K]``: one row per evaluated model (preference), one column per task, to be
maximised. pymoo minimises, so it sees ``-Acc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pymoo.indicators.gd import GD
from pymoo.indicators.hv import HV
from pymoo.indicators.igd import IGD
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def _matrix(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> np.ndarray:
    acc = accuracy.detach().cpu().numpy() if isinstance(accuracy, torch.Tensor) else np.asarray(accuracy)
    acc = acc.astype(np.float64)
    if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 2:
        raise ValueError(f"an accuracy front must be [P >= 1, K >= 2], got shape {acc.shape}")
    if not np.isfinite(acc).all() or (acc < 0).any():
        raise ValueError("an accuracy front must hold finite non-negative values")
    return acc


def non_dominated(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Row indices of the non-dominated points of ``Acc [P, K]`` (maximisation)."""
    return np.sort(NonDominatedSorting().do(-_matrix(accuracy), only_non_dominated_front=True))


def hypervolume(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                scale: Sequence[float] | np.ndarray | None = None) -> float:
    """Hypervolume of ``Acc [P, K]`` under maximisation with reference point 0.

    scale: optional per-task divisor ``[K]`` (e.g. the individual models' accuracies, for the normalised HV).
    Dominated points add nothing, so all rows may be passed.
    """
    acc = _matrix(accuracy)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != (acc.shape[1],) or not (scale > 0).all():
            raise ValueError(f"scale must be [K={acc.shape[1]}] positive values, got {scale!r}")
        acc = acc / scale
    return float(HV(ref_point=np.zeros(acc.shape[1]))(-acc))


def preference_weighted_sum(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                            preferences: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> np.ndarray:
    """``[P]``: ``Σ_k p_k · Acc[p, k]`` for each preference row (MAP Table 4), preferences normalised to sum 1.

    accuracy: ``[P, K]``, row p the accuracies of the model a method gives for preference p (a single-model
    method repeats its one row). preferences: ``[P, K]``, non-negative with positive row sums.
    """
    acc = _matrix(accuracy)
    prefs = np.asarray(preferences.detach().cpu() if isinstance(preferences, torch.Tensor) else preferences,
                       dtype=np.float64)
    if prefs.shape != acc.shape:
        raise ValueError(f"preferences {prefs.shape} and accuracies {acc.shape} must both be [P, K]")
    if not np.isfinite(prefs).all() or (prefs < 0).any() or not (prefs.sum(1) > 0).all():
        raise ValueError("preferences must be finite, non-negative, with a positive sum per row")
    return (prefs / prefs.sum(1, keepdims=True) * acc).sum(1)


def _against_reference(indicator: type, accuracy, reference) -> float:
    acc, ref = _matrix(accuracy), _matrix(reference)
    if acc.shape[1] != ref.shape[1]:
        raise ValueError(f"front and reference must have the same K, got {acc.shape[1]} and {ref.shape[1]}")
    return float(indicator(-ref)(-acc))


def generational_distance(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                          reference: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> float:
    """GD of the front ``Acc [P, K]`` to a reference front ``[Q, K]`` (e.g. a dense grid search): the mean distance
    from each point to its nearest reference point (pymoo ``GD`` on ``−Acc``)."""
    return _against_reference(GD, accuracy, reference)


def inverted_generational_distance(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                                   reference: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> float:
    """IGD: the mean distance from each reference point to its nearest front point (pymoo ``IGD`` on ``−Acc``)."""
    return _against_reference(IGD, accuracy, reference)


def win_rate(accuracy_a: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
             accuracy_b: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> float:
    """MAP paper §4.1: the share of (point of A, point of B, task) triples where A's accuracy is higher,
    ``(1/(P·Q·K)) Σ_i Σ_j Σ_k 1[A[i,k] > B[j,k]]`` (SPEC §4 writes P² for fronts of equal size)."""
    a, b = _matrix(accuracy_a), _matrix(accuracy_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fronts must have the same K, got {a.shape[1]} and {b.shape[1]}")
    return float((a[:, None, :] > b[None, :, :]).mean())


def front_spread(accuracy: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> float:
    """Diversity of a front: the mean over tasks of the range (max − min) of the non-dominated points' accuracies.

    0 when the front is a single point (every preference gives the same trade-off); in accuracy units.
    """
    acc = _matrix(accuracy)
    front = acc[non_dominated(acc)]
    return float((front.max(0) - front.min(0)).mean())
