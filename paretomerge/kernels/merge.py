"""The merged-forward kernel: the one place where merged weights are built and run (SPEC §2).

    θ^l = θ0^l + Σ_k c[..., l, k] · τ_k^l + Δ^l

Every method (Pareto Merging, AdaMerging, the static baselines, MAP) is a choice of ``c`` and ``Δ``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class _TaskVectorSum(torch.autograd.Function):
    """Σ_k c[..., k] τ_k in ``dtype``. Saves τ as stored (a bf16 τ stays bf16), not an upcast copy per layer."""

    @staticmethod
    def forward(ctx, row: Tensor, tau: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(row, tau)
        return torch.tensordot(row.to(dtype), tau.to(dtype), dims=([-1], [0]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        row, tau = ctx.saved_tensors
        # ∂/∂c[..., k] = <grad[...], τ_k>, contracting the weight's own dimensions.
        dims = tau.ndim - 1
        grad_row = torch.tensordot(
            grad, tau.to(grad.dtype), dims=(list(range(grad.ndim - dims, grad.ndim)), list(range(1, tau.ndim)))
        )
        return grad_row.to(row.dtype), None, None


def _coefficient_rows(coefficients: Tensor, num_layers: int, num_tasks: int) -> Tensor:
    """Normalise coefficients to ``[*models, L or 1, K]``."""
    if coefficients.shape[-1:] != (num_tasks,):
        raise ValueError(f"coefficients must end in K={num_tasks}, got shape {tuple(coefficients.shape)}")
    if coefficients.ndim == 1:  # task-wise [K]
        return coefficients.unsqueeze(0)
    if coefficients.shape[-2] not in (1, num_layers):
        raise ValueError(
            f"coefficients of shape {tuple(coefficients.shape)}: expected [K], [L, K] with L={num_layers}, "
            f"or a leading model dimension [M, L, K]; for several task-wise models pass [M, 1, K]"
        )
    return coefficients


def merge(
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor] | None = None,
    coefficients: Tensor | None = None,
    deltas: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Merged parameters for every layer of ``theta0``.

    theta0:       name -> ``[*shape]``; its order defines the layer index ``l``.
    tau:          name -> ``[K, *shape]`` (any float dtype; the sum is taken in θ0's dtype), or None.
    coefficients: ``[K]`` task-wise, ``[L, K]`` layer-wise, or ``[*M, L|1, K]`` for several models at once.
    deltas:       name -> ``[*shape]`` or ``[*M, *shape]``, added after the task-vector sum.
    Returns name -> ``[*M, *shape]``. Differentiable in ``coefficients`` and ``deltas``.
    """
    names = list(theta0)
    rows = None
    if tau is not None:
        if coefficients is None:
            raise ValueError("merge: task vectors given without coefficients")
        num_tasks = next(iter(tau.values())).shape[0]
        rows = _coefficient_rows(coefficients, len(names), num_tasks)
    deltas = deltas or {}
    unknown = set(deltas) - set(names)
    if unknown:
        raise ValueError(f"merge: deltas for layers that are not merged: {sorted(unknown)[:3]}")

    merged = {}
    for index, name in enumerate(names):
        weight = theta0[name]
        if rows is not None:
            row = rows[..., index if rows.shape[-2] > 1 else 0, :]
            weight = weight + _TaskVectorSum.apply(row, tau[name], weight.dtype)
        if name in deltas:
            weight = weight + deltas[name].to(weight.dtype)
        merged[name] = weight
    return merged


def forward_features(backbone: nn.Module, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """Run ``backbone`` with ``params`` substituted for its own (buffers are its own)."""
    return torch.func.functional_call(backbone, dict(params), (images,))


def forward_features_many(backbone: nn.Module, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """`forward_features` for M models at once: ``params`` name -> ``[M, *shape]`` (a leading model dimension, as
    `merge` returns for ``[M, 1|L, K]`` coefficients), the same ``images`` for each. Returns ``[M, B, D]``."""
    return torch.func.vmap(lambda p: forward_features(backbone, p, images))(dict(params))


def forward_tasks(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    params: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Logits per task: one backbone call over the concatenated task batches, then each task's head.

    batch: task -> images ``[B_k, C, H, W]``. Returns task -> logits ``[B_k, C_k]``.
    """
    tasks = list(batch)
    sizes = [batch[t].shape[0] for t in tasks]
    features = forward_features(backbone, params, torch.cat([batch[t] for t in tasks]))
    return {t: heads[t](f) for t, f in zip(tasks, features.split(sizes), strict=True)}


def select_model(params: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    """Model ``index`` out of parameters with one leading model dimension ``[M, *shape]``."""
    return {name: p[index] for name, p in params.items()}
