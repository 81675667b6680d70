"""The merged-forward kernel: the one place where merged weights are built and run (SPEC §2).

    θ^l = θ0^l + Σ_k c[..., l, k] · τ_k^l + Δ^l

Every method (Pareto Merging, AdaMerging, the static baselines, MAP) is a choice of ``c`` and ``Δ``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from paretomerge.kernels.basis import PreferenceBasis
from paretomerge.kernels.inputs import Inputs, arguments, concatenate, separate


class _TaskVectorMerge(torch.autograd.Function):
    """Every layer's ``base_l + Σ_k c[..., l, k] τ_k^l`` in one autograd node, each layer one BLAS call (``addmv``
    for one model, ``addmm`` for ``[*M]`` models) in ``base_l``'s dtype.

    Against a per-layer ``tensordot`` then add, this reads τ once and writes the result once, and it keeps the
    per-layer autograd bookkeeping (an index node per row of ``c``, a node per layer) out of the step: measured in
    benchmarks/README.md ("Issue 8: the physical limit", §3). τ is saved as stored (a bf16 τ stays bf16), not as an
    upcast copy.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, num_layers: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        bases, taus = tensors[:num_layers], tensors[num_layers:]
        ctx.save_for_backward(*taus)
        ctx.set_materialize_grads(False)  # a layer whose output is unused sends no gradient, not a zero tensor
        ctx.rows_shape, ctx.rows_dtype, ctx.num_layers = rows.shape, rows.dtype, num_layers
        outputs = []
        for c, base, tau in zip(_rows_per_layer(rows, num_layers), bases, taus, strict=True):
            c = c.to(base.dtype)
            flat = tau.reshape(tau.shape[0], -1).to(base.dtype)  # [K, N]: a view unless τ has another dtype
            if c.ndim == 1:
                outputs.append(torch.addmv(base.reshape(-1), flat.T, c).view(base.shape))
            else:
                merged = torch.addmm(base.reshape(1, -1), c.reshape(-1, c.shape[-1]), flat)
                outputs.append(merged.view(*c.shape[:-1], *base.shape))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        taus = ctx.saved_tensors
        num_layers, lead = ctx.num_layers, ctx.rows_shape[:-2]  # lead: the model dimensions [*M]
        grad_rows = None
        if ctx.needs_input_grad[0]:
            per_layer = []
            for grad, tau in zip(grads, taus, strict=True):
                if grad is None:  # this layer's output was not used
                    per_layer.append(torch.zeros(*lead, tau.shape[0], dtype=ctx.rows_dtype, device=tau.device))
                    continue
                # ∂/∂c[..., l, k] = <grad_l[...], τ_k^l> over the layer's own entries.
                flat = tau.reshape(tau.shape[0], -1).to(grad.dtype)
                value = (grad.reshape(-1, flat.shape[1]) @ flat.T).reshape(*lead, flat.shape[0]) if lead \
                    else torch.mv(flat, grad.reshape(-1))
                per_layer.append(value.to(ctx.rows_dtype))
            if ctx.rows_shape[-2] > 1:
                grad_rows = torch.stack(per_layer, dim=-2)
            else:  # one task-wise row served every layer
                grad_rows = torch.stack(per_layer).sum(0).unsqueeze(-2)
        grad_bases = []
        for layer, grad in enumerate(grads):
            needed = ctx.needs_input_grad[2 + layer] and grad is not None
            grad_bases.append((grad.sum(dim=tuple(range(len(lead)))) if lead else grad) if needed else None)
        return (grad_rows, None, *grad_bases, *([None] * num_layers))


def _rows_per_layer(rows: Tensor, num_layers: int) -> list[Tensor]:
    """Each layer's coefficients ``[*M, K]`` out of ``[*M, L|1, K]`` (a task-wise row serves every layer)."""
    return list(rows.unbind(-2)) if rows.shape[-2] > 1 else [rows[..., 0, :]] * num_layers


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


def preference_coefficients(
    lambdas: Tensor, omega: Tensor, gamma: Tensor, bounds: tuple[float, float] | None = None
) -> Tensor:
    """Preference-conditioned task-vector coefficients (our extension of Pareto Merging, not the paper's):

        c(γ) = clamp(λ + ω ⊙ (K·γ − 1), bounds)

    ``lambdas``, ``omega``: ``[L, K]``; ``gamma``: ``[K]`` or ``[M, K]``. Returns ``[L, K]`` or ``[M, L, K]``, the
    ``coefficients`` of `merge`. At the equal preference K·γ − 1 = 0, so c = λ (clamped); at the one-hot e_k task k's
    coefficient moves by (K−1)·ω[:, k] and every other task's by −ω[:, j]. Linear in γ inside the bounds.
    """
    num_tasks = lambdas.shape[-1]
    if gamma.shape[-1:] != (num_tasks,) or gamma.ndim not in (1, 2):
        raise ValueError(f"gamma must be [K] or [M, K] with K={num_tasks}, got {tuple(gamma.shape)}")
    shift = num_tasks * gamma.to(lambdas.dtype) - 1.0  # [K] or [M, K]
    coefficients = lambdas + omega * shift.unsqueeze(-2)  # [L, K] or [M, L, K]
    return coefficients if bounds is None else coefficients.clamp(*bounds)


def merge(
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor] | PreferenceBasis | None = None,
    coefficients: Tensor | None = None,
    deltas: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Merged parameters for every layer of ``theta0``.

    theta0:       name -> ``[*shape]``; its order defines the layer index ``l``.
    tau:          name -> ``[K, *shape]`` (any float dtype; the sum is taken in θ0's dtype), a `PreferenceBasis`
                  (factored layers add ``Σ_k c_k U_k V_kᵀ`` as one low-rank product; layers it leaves out add nothing),
                  or None.
    coefficients: ``[K]`` task-wise, ``[L, K]`` layer-wise, or ``[*M, L|1, K]`` for several models at once.
    deltas:       name -> ``[*shape]`` or ``[*M, *shape]``, added after the task-vector sum.
    Returns name -> ``[*M, *shape]``. Differentiable in ``theta0``, ``coefficients`` and ``deltas``.
    """
    names = list(theta0)
    deltas = deltas or {}
    unknown = set(deltas) - set(names)
    if unknown:
        raise ValueError(f"merge: deltas for layers that are not merged: {sorted(unknown)[:3]}")
    device = next(iter(theta0.values())).device.type if names else "cpu"
    with torch.autocast(device, enabled=False):  # under mixed precision too, the sum is taken in θ0's dtype
        return _merge(theta0, names, tau, coefficients, deltas)


def _merge(theta0: Mapping[str, Tensor], names: list[str], tau: Mapping[str, Tensor] | PreferenceBasis | None,
           coefficients: Tensor | None, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    merged = {name: theta0[name] for name in names}
    if tau is not None:
        if coefficients is None:
            raise ValueError("merge: task vectors given without coefficients")
        if not isinstance(tau, PreferenceBasis):
            missing = [name for name in names if name not in tau]
            if missing:
                raise ValueError(f"merge: no task vectors for layers {missing[:3]}")
        basis = tau if isinstance(tau, PreferenceBasis) else PreferenceBasis.full(tau)
        rows = _coefficient_rows(coefficients, len(names), basis.num_tasks)
        per_layer = dict(zip(names, _rows_per_layer(rows, len(names)), strict=True))
        dense = [name for name in names if name in basis.dense]
        if dense:  # one fused node for every dense layer
            dense_rows = rows if len(dense) == len(names) or rows.shape[-2] == 1 else \
                rows[..., [names.index(name) for name in dense], :]
            merged.update(zip(dense, _TaskVectorMerge.apply(dense_rows, len(dense), *(merged[n] for n in dense),
                                                             *(basis.dense[n] for n in dense)), strict=True))
        for name in basis.factors:
            merged[name] = basis.add_to(name, merged[name], per_layer[name])
        lead = rows.shape[:-2]
        for name in names if lead else ():  # layers the basis leaves out: the same base for every model (a view)
            if name not in basis.dense and name not in basis.factors:
                merged[name] = merged[name].expand(*lead, *merged[name].shape)
    for name, delta in deltas.items():
        merged[name] = merged[name] + delta.to(merged[name].dtype)
    return merged


def features_of(output: Any) -> Tensor:
    """A backbone's output as the tensor the heads read: the output itself when it is a tensor, a Hugging Face
    vision output's ``pooler_output`` (a ``CLIPVisionModel``'s pooled, layer-normed class token, as FusionBench's CLIP
    heads read it), or a Hugging Face causal LM's ``logits [B, T, V]`` (whose heads are identities)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("pooler_output", "logits"):
            if isinstance(output.get(key), Tensor):
                return output[key]
    raise TypeError(
        f"the backbone returned a {type(output).__name__}; a backbone must return its features as a tensor [B, D] "
        "(or a Hugging Face output with pooler_output or logits): wrap it in an nn.Module whose forward returns the "
        "features"
    )


_SHAPE_ERROR = re.compile(r"shape|size|dimension|mat1|mat2", re.I)


def run_head(task: str, head: nn.Module, features: Tensor) -> Tensor:
    """``head(features)``, saying which task's head does not accept the backbone's features, and their shape (other
    errors, such as a wrong device, pass through as they are)."""
    try:
        return head(features)
    except RuntimeError as err:  # mismatched shapes surface as RuntimeError
        if isinstance(err, torch.OutOfMemoryError) or not _SHAPE_ERROR.search(str(err)):
            raise
        raise ValueError(f"the head of task {task!r} ({type(head).__name__}) does not accept the backbone's "
                         f"features of shape {tuple(features.shape)} ({features.dtype}): {err}") from err


def check_labels(logits: Tensor, labels: Tensor, task: str | None = None) -> None:
    """Refuse labels outside a head's classes: its class count is its output width (no nn.Linear is looked for)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        where = f"task {task!r}: " if task else ""
        raise ValueError(f"{where}labels range over [{int(labels.min())}, {int(labels.max())}] but the head gives "
                         f"{logits.shape[-1]} classes (logits {tuple(logits.shape)}); is it the right head?")


def forward_features(backbone: nn.Module, params: Mapping[str, Tensor], inputs: Inputs) -> Tensor:
    """Run ``backbone`` on ``inputs`` (images, or a token batch: `kernels.inputs`) with ``params`` substituted for its
    own (buffers are its own; a tied weight follows its twin); its features (`features_of`: a causal LM's logits)."""
    return features_of(torch.func.functional_call(backbone, dict(params), *arguments(backbone, inputs)))


def forward_features_many(backbone: nn.Module, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """`forward_features` for M models at once: ``params`` name -> ``[M, *shape]`` (a leading model dimension, as
    `merge` returns for ``[M, 1|L, K]`` coefficients), the same ``images`` for each. Returns ``[M, B, D]``."""
    return torch.func.vmap(lambda p: forward_features(backbone, p, images))(dict(params))


def compile_backend(compile_forward: bool | str) -> str | None:
    """The ``torch.compile`` backend for the merged forward: False -> None (eager), True -> ``"inductor"``, or a
    backend's name (``"aot_eager"``, ``"cudagraphs"``...)."""
    if compile_forward is False or compile_forward is None:
        return None
    if compile_forward is True:
        return "inductor"
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(compile_forward, str) or compile_forward not in backends:
        raise ValueError(f"compile_forward must be true, false or a torch.compile backend {backends}, "
                         f"got {compile_forward!r}")
    return compile_forward


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compiled_forward_features(backend: str = "inductor") -> Callable[..., Tensor]:
    """`forward_features` through ``torch.compile(backend=backend)``, compiled once per backend and process; call it
    as ``fn(backbone, params, images)``. Dynamo guards on the backbone, so each backbone gets its own graph; nothing
    here holds a backbone alive."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(forward_features, backend=backend)
    return _COMPILED[backend]


def forward_tasks(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    params: Mapping[str, Tensor],
    batch: Mapping[str, Inputs],
    compile_backend: str | None = None,
) -> dict[str, Tensor]:
    """Outputs per task: one backbone call over the concatenated task batches, then each task's head.

    batch: task -> images ``[B_k, C, H, W]`` or a token batch (`kernels.inputs`). Returns task -> logits ``[B_k, C_k]``
    (a causal LM: ``[B_k, T_k, V]``). ``compile_backend`` (e.g. ``"inductor"``) runs the backbone through
    `compiled_forward_features`; None runs it eagerly.
    """
    tasks = list(batch)
    inputs, sizes, lengths = concatenate([batch[t] for t in tasks])
    run = compiled_forward_features(compile_backend) if compile_backend else forward_features
    features = run(backbone, dict(params), inputs)
    return {t: run_head(t, heads[t], f) for t, f in zip(tasks, separate(features, sizes, lengths), strict=True)}


def select_model(params: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    """Model ``index`` out of parameters with one leading model dimension ``[M, *shape]``."""
    return {name: p[index] for name, p in params.items()}
