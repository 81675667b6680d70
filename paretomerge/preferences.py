"""Preferences on the simplex: seeded Dirichlet draws, grids, and validation of user input (SPEC §3, §4, §7)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def validate_preference(preference: Sequence[float] | np.ndarray | Tensor, num_tasks: int) -> Tensor:
    """Check a user preference and return it normalised to sum 1, as float32 ``[K]``.

    Refused: wrong length or rank, non-numbers, NaN/inf, a negative entry, or a zero sum.
    """
    if isinstance(preference, (str, bytes)):
        raise TypeError(f"preference must be a sequence of {num_tasks} numbers, got a string")
    if isinstance(preference, Tensor):
        if preference.dtype == torch.bool or preference.is_complex():
            raise TypeError(f"preference must hold real numbers, got a {preference.dtype} tensor")
        preference = preference.detach().cpu().double().numpy()
    try:
        array = np.asarray(preference)
    except (TypeError, ValueError) as err:
        raise TypeError(f"preference must be a sequence of {num_tasks} numbers: {err}") from err
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"preference must hold numbers, got dtype {array.dtype}: {preference!r}")
    if array.ndim != 1 or array.shape[0] != num_tasks:
        raise ValueError(f"preference must have {num_tasks} entries (one per task), got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"preference contains NaN or inf: {array.tolist()}")
    if (array < 0).any():
        raise ValueError(f"preference entries must be non-negative, got {array.tolist()}")
    total = array.sum()
    if not total > 0:
        raise ValueError(f"preference must have a positive sum, got {array.tolist()}")
    if not np.isfinite(total):
        raise ValueError(f"preference entries are too large to normalise (their sum overflows): {array.tolist()}")
    return torch.as_tensor(array / total, dtype=torch.float32)


def preference_for(preference: Sequence[float] | np.ndarray | Tensor | None, task_names: Sequence[str],
                   preference_aware: bool, owner: str) -> Tensor | None:
    """The γ for ``owner.at(preference)``: validated and normalised, or None for a model that does not depend on it.
    A preference-aware owner refuses None, naming its tasks."""
    if preference is None:
        if preference_aware:
            raise ValueError(f"{owner}.at needs a preference: {len(task_names)} non-negative weights, one per task "
                             f"({', '.join(task_names)})")
        return None
    return validate_preference(preference, len(task_names))


def sample_dirichlet(num_tasks: int, alpha: float, seed: int, step: int, rank: int = 0,
                     mixed_tasks: int | None = None) -> Tensor:
    """γ ~ Dir(α·1), a pure function of ``(seed, step, rank)`` so a resumed run repeats its draws.

    With ``mixed_tasks`` = m < K, γ mixes m tasks chosen uniformly at random (Dir(α·1) over them, 0 elsewhere): a
    draw's largest weight is then distributed as at K = m whatever K is. With m ≥ K or None the draw is the plain one,
    the same numbers as before the switch existed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, rank]))
    if mixed_tasks is None or mixed_tasks >= num_tasks:
        return torch.as_tensor(rng.dirichlet(np.full(num_tasks, float(alpha))), dtype=torch.float32)
    chosen = rng.choice(num_tasks, size=mixed_tasks, replace=False)
    gamma = np.zeros(num_tasks)
    gamma[chosen] = rng.dirichlet(np.full(mixed_tasks, float(alpha)))
    return torch.as_tensor(gamma, dtype=torch.float32)


def simplex_grid(num_tasks: int, n_partitions: int) -> Tensor:
    """Das-Dennis points on the simplex (pymoo reference directions): ``[C(n+K-1, K-1), K]``."""
    from pymoo.util.ref_dirs import get_reference_directions

    points = get_reference_directions("das-dennis", num_tasks, n_partitions=n_partitions)
    return torch.as_tensor(points, dtype=torch.float32)


def equal_and_one_hots(num_tasks: int) -> Tensor:
    """The equal preference followed by the K one-hots: ``[K+1, K]``."""
    return torch.cat([torch.full((1, num_tasks), 1.0 / num_tasks), torch.eye(num_tasks)])


def dirichlet_set(num_tasks: int, count: int, seed: int = 0, alpha: float = 1.0) -> Tensor:
    """``[count, K]`` seeded Dirichlet(α·1) draws, keyed by ``(seed, K)``: the same seed gives the same set."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_tasks]))
    return torch.as_tensor(rng.dirichlet(np.full(num_tasks, float(alpha)), size=count), dtype=torch.float32)


def front_preferences(num_tasks: int, seed: int = 0, total: int = 30) -> Tensor:
    """The preference set used to evaluate a front (SPEC §4)."""
    if num_tasks == 2:
        return simplex_grid(2, 10)
    if num_tasks == 3:
        return simplex_grid(3, 7)
    fixed = equal_and_one_hots(num_tasks)
    return torch.cat([fixed, dirichlet_set(num_tasks, max(total - fixed.shape[0], 0), seed)])


#: how far from 1 an export's preference may sum
PREFERENCE_TOLERANCE = 1e-6


def export_preference(value: str | Sequence[float] | Tensor, task_names: Sequence[str]) -> Tensor:
    """The preference an export is asked for, read strictly: ``K`` numbers (a sequence, or a string of K
    comma-separated numbers), ``"equal"``, or a task's name (its one-hot). Refused, naming the problem: a wrong
    length, a negative, NaN or infinite entry, or a sum that is not 1 within `PREFERENCE_TOLERANCE` (an export records
    the preference it was asked for, so nothing is normalised). Returns float32 ``[K]``."""
    names, k = list(task_names), len(task_names)
    how = (f"write {k} comma-separated numbers that sum to 1 (e.g. {','.join([f'{1 / k:.4g}'] * k)}), 'equal', or a "
           f"task's name for its one-hot ({', '.join(names)})")
    if isinstance(value, str):
        text = value.strip()
        if text == "equal":
            return torch.full((k,), 1.0 / k)
        if text in names:
            return torch.nn.functional.one_hot(torch.tensor(names.index(text)), k).float()
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise ValueError(f"preference {value!r} is neither numbers, 'equal' nor a task's name: {how}") from None
    elif isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"preference must be {k} real numbers, got a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)}")
        values = value.detach().cpu().double().tolist()
    else:
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"preference must be a string or a sequence of {k} numbers, got {value!r}") from None
    if len(values) != k:
        raise ValueError(f"preference {value!r} has {len(values)} entries, but the model has {k} tasks "
                         f"({', '.join(names)}): {how}")
    bad = [f"{t}={v}" for t, v in zip(names, values, strict=True) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"preference {value!r} has non-finite entries ({', '.join(bad)}): {how}")
    bad = [f"{t}={v}" for t, v in zip(names, values, strict=True) if v < 0]
    if bad:
        raise ValueError(f"preference {value!r} has negative entries ({', '.join(bad)}): {how}")
    total = math.fsum(values)
    if abs(total - 1.0) > PREFERENCE_TOLERANCE:
        raise ValueError(f"preference {value!r} sums to {total:.10g}, not 1 (within {PREFERENCE_TOLERANCE:g}): {how}")
    return validate_preference(values, k)
