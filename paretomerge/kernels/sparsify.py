"""Task-vector preprocessing (SPEC §5): TIES trim + sign election, and DARE drop-and-rescale.

Pure functions from stacked task vectors ``name -> [K, *shape]`` to new ones of the same shapes and dtypes.
They never merge: a merge is always ``kernels.merge`` over the vectors they return (`TaskVectors.ties`,
`TaskVectors.dare` wrap them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


def check_fraction(name: str, value: float, *, allow_one: bool) -> float:
    """A rate in (0, 1] (``allow_one``) or (0, 1); refused with a message otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, 1{']' if allow_one else ')'}, got {value!r}")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value > 0 and upper_ok):
        why = "" if allow_one else " (1 would drop every entry, and the rescale 1/(1-p) is undefined)"
        raise ValueError(f"{name} must be in (0, 1{']' if allow_one else ')'}, got {value!r}{why}")
    return float(value)


def trim_thresholds(tau: Mapping[str, Tensor], top_k: float) -> Tensor:
    """``[K]``: per task, the magnitude of its ``ceil(top_k · N)``-th largest entry, ranked over the whole
    flattened task vector (all layers together, as the TIES implementation does; not per layer)."""
    num_tasks = next(iter(tau.values())).shape[0]
    thresholds = []
    for k in range(num_tasks):
        magnitudes = torch.cat([t[k].detach().abs().flatten().float() for t in tau.values()])
        keep = max(1, math.ceil(top_k * magnitudes.numel()))
        thresholds.append(torch.kthvalue(magnitudes.cpu(), magnitudes.numel() - keep + 1).values)
    return torch.stack(thresholds)


def ties_select(tau: Mapping[str, Tensor], top_k: float = 0.2) -> dict[str, Tensor]:
    """TIES preprocessing: ``τ'_k`` = ``τ_k`` trimmed to its top ``top_k`` entries by magnitude, then masked to
    the entries whose sign agrees with the elected sign ``sign(Σ_k trimmed τ_k)``.

    An entry whose trimmed sum is exactly zero takes the majority sign: the sign of the sum of the elected
    signs over every entry of every layer (+1 on a tie). Shapes and dtypes are kept.
    """
    top_k = check_fraction("TIES top_k (the fraction of each task vector kept)", top_k, allow_one=True)
    thresholds = trim_thresholds(tau, top_k)
    trimmed, elected = {}, {}
    for name, t in tau.items():
        values = t.detach().float()
        shape = (-1,) + (1,) * (values.ndim - 1)
        kept = values * (values.abs() >= thresholds.to(values.device).view(shape))
        trimmed[name] = kept
        elected[name] = torch.sign(kept.sum(0))
    total = sum(float(e.sum()) for e in elected.values())
    majority = -1.0 if total < 0 else 1.0
    selected = {}
    for name, kept in trimmed.items():
        sign = elected[name]
        sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
        agree = (torch.sign(kept) == sign) & (kept != 0)
        selected[name] = (kept * agree).to(tau[name].dtype)
    return selected


def disjoint_mean_split(selected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``τ'_k / n`` per entry, with ``n`` the number of tasks whose selected entry is nonzero (at least 1), so
    that ``Σ_k`` of the result is TIES's disjoint mean of the selected vectors."""
    out = {}
    for name, t in selected.items():
        values = t.float()
        count = (values != 0).sum(0).clamp_min(1)
        out[name] = (values / count).to(t.dtype)
    return out


def dare_drop(tau: Mapping[str, Tensor], drop: float = 0.5, seed: int = 0) -> dict[str, Tensor]:
    """DARE: zero each entry of each ``τ_k`` with probability ``drop`` and rescale the rest by ``1/(1−drop)``,
    so every entry keeps its expectation. The masks are drawn on the CPU from ``(seed, task, layer)``, so
    they do not depend on the device or on which other layers exist."""
    drop = check_fraction("DARE drop rate", drop, allow_one=False)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"DARE seed must be a non-negative int, got {seed!r}")
    out = {}
    for index, (name, t) in enumerate(tau.items()):
        layers = []
        for k in range(t.shape[0]):
            state = np.random.SeedSequence([seed, k, index]).generate_state(2)
            generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            keep = torch.rand(t[k].shape, generator=generator) >= drop
            layers.append(t[k].detach().float() * keep.to(t.device) / (1.0 - drop))
        out[name] = torch.stack(layers).to(t.dtype)
    return out
