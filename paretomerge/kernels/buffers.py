"""Float buffers under one policy (SPEC §3c): what a merged model's BatchNorm running statistics are.

A merge writes parameters; a backbone's float buffers (BatchNorm's ``running_mean`` and ``running_var``, in its state
dict) are the statistics its layers normalise with, and a fine-tune moves them too. `TaskVectors` holds the policy,
and every merge takes its buffers from `buffers_for`, so the static merges, MAP, AdaMerging, ours and ``at(γ)`` agree:

- ``pretrained``: θ0's buffers, as they are (what every merge did before the policy existed);
- ``merged``: each buffer merged as its layer's parameters are, ``b0 + Σ_k c[l, k] (b_k − b0)``, with ``l`` the layer
  of the module that owns it (its ``weight``; a module without merged parameters takes the mean over layers), and a
  running variance kept at or above 0;
- ``recomputed``: the running statistics of the merged model estimated again on unlabeled inputs of every task
  (`TaskVectors.calibration`): the BatchNorm layers alone run in ``train`` mode with a cumulative average
  (``momentum=None``), over chunks of the inputs, under ``no_grad``; every module's mode and momentum are restored.
  The module's own forward (`MergingModule.forward`: the training step, and the accuracies the validation loop logs)
  uses each batch's own statistics instead (a batch holds every task's inputs, as the calibration set does), so a
  step costs no extra pass; ``at(γ)``, the fronts, MAP and the static merges use the recomputed ones.

Integer buffers (``num_batches_tracked``) are never merged, and a backbone without float buffers runs exactly as it
did before the policy existed, under every policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

TaskVectors = Any  # a `kernels.TaskVectors` (which imports this module: named here, not imported)

BUFFER_POLICIES = ("pretrained", "merged", "recomputed")
#: The default policy (benchmarks/README.md, "ResNets and BatchNorm": chosen there by measurement).
DEFAULT_BUFFER_POLICY = "recomputed"
#: Calibration inputs a suite takes for ``recomputed`` (over every task, equal shares), and the chunk they run in.
CALIBRATION_IMAGES = 256
CALIBRATION_CHUNK = 128


def check_policy(policy: str) -> str:
    if policy not in BUFFER_POLICIES:
        raise ValueError(f"buffer_policy must be one of {list(BUFFER_POLICIES)}, got {policy!r}")
    return policy


def calibration_set(per_task: Mapping[str, Tensor], total: int = CALIBRATION_IMAGES) -> Tensor:
    """``total`` unlabeled inputs, equal shares of every task's (the first ones of each), interleaved task by task so
    that every chunk of `recompute_statistics` holds every task."""
    tasks = list(per_task)
    share = min(max(1, total // len(tasks)), *(len(per_task[t]) for t in tasks))
    return torch.stack([per_task[t][:share] for t in tasks], dim=1).flatten(0, 1)


def float_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The module's floating-point buffers that its state dict holds (non-persistent ones are not the model's)."""
    state = set(module.state_dict(keep_vars=True))
    return {n: b for n, b in module.named_buffers() if n in state and b.is_floating_point()}


def _norm_layers(backbone: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _owner_rows(names: list[str], layer_names: tuple[str, ...]) -> dict[str, int | None]:
    """buffer -> the index of its module's first merged parameter (``weight`` first), or None."""
    rows = {}
    for name in names:
        prefix = name.rpartition(".")[0]
        owned = [i for i, layer in enumerate(layer_names) if layer.rpartition(".")[0] == prefix]
        weight = [i for i in owned if layer_names[i].endswith(".weight")]
        rows[name] = (weight or owned or [None])[0]
    return rows


def merge_buffers(task_vectors: TaskVectors, coefficients: Tensor) -> dict[str, Tensor]:
    """``b0 + Σ_k c[l(b), k] τ_b[k]`` for every float buffer; ``coefficients`` as `kernels.merge` takes them (``[K]``,
    ``[L, K]``, ``[*M, L|1, K]``). Returns name -> ``[*M, *shape]``, without gradients."""
    tau = task_vectors.buffer_tau
    if not tau:
        return {}
    own = float_buffers(task_vectors.backbone)
    rows = _owner_rows(list(tau), task_vectors.layer_names)
    c = coefficients.detach()
    c = c.unsqueeze(0) if c.ndim == 1 else c  # [*M, L|1, K]
    out = {}
    for name, t in tau.items():
        index = rows[name]
        row = c.mean(-2) if index is None else c[..., index if c.shape[-2] > 1 else 0, :]  # [*M, K]
        value = own[name] + torch.tensordot(row.to(t.dtype), t, dims=([-1], [0])).to(own[name].dtype)
        if name.endswith("running_var"):
            value = value.clamp(min=0.0)
        out[name] = value
    return out


def batch_statistics(task_vectors: TaskVectors) -> dict[str, None]:
    """The running statistics replaced by None: a BatchNorm given none normalises with its batch's own statistics
    (and updates nothing)."""
    return {f"{prefix}.{kind}": None for prefix in _norm_layers(task_vectors.backbone)
            for kind in ("running_mean", "running_var")}


@torch.no_grad()
def recompute_statistics(task_vectors: TaskVectors, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The running statistics of the model ``params`` (one model) estimated on ``task_vectors.calibration``."""
    from paretomerge.kernels.merge import forward_features

    calibration = task_vectors.calibration
    if calibration is None:
        raise ValueError("buffer_policy='recomputed' needs calibration inputs (unlabeled images of every task) to "
                         "estimate the merged model's BatchNorm statistics on: a suite gives them with its task "
                         "vectors, a fit takes them from its training data, or call task_vectors.configure_buffers("
                         "'recomputed', calibration=images); or choose buffer_policy='merged' or 'pretrained'")
    layers = _norm_layers(task_vectors.backbone)
    if not layers:
        return {}
    fresh: dict[str, Tensor] = {}
    for prefix, m in layers.items():
        fresh[f"{prefix}.running_mean"] = torch.zeros_like(m.running_mean)
        fresh[f"{prefix}.running_var"] = torch.ones_like(m.running_var)
        fresh[f"{prefix}.num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
    saved = {prefix: (m.training, m.momentum) for prefix, m in layers.items()}
    try:
        for m in layers.values():
            m.train()
            m.momentum = None  # a cumulative average over the chunks
        values = {**params, **fresh}
        for chunk in calibration.to(next(iter(fresh.values())).device).split(CALIBRATION_CHUNK):
            forward_features(task_vectors.backbone, values, chunk)
    finally:
        for prefix, (training, momentum) in saved.items():
            layers[prefix].train(training)
            layers[prefix].momentum = momentum
    return {name: t for name, t in fresh.items() if t.is_floating_point()}


def buffers_for(task_vectors: TaskVectors, coefficients: Tensor, params: Mapping[str, Tensor] | None = None,
                policy: str | None = None) -> dict[str, Tensor | None]:
    """The float buffers of merged models under the task vectors' policy (or ``policy``), to pass beside their
    parameters to the forward or to `materialize`: empty for ``pretrained`` or a backbone without float buffers.

    ``coefficients``: the task-vector coefficients the parameters were merged with (as `kernels.merge` takes them).
    ``params``: the merged parameters (name -> ``[*shape]``, or ``[M, *shape]`` for M models); ``recomputed`` estimates
    each model's statistics on them. Without ``params``, ``recomputed`` gives `batch_statistics` (a training forward).
    """
    policy = check_policy(policy or task_vectors.buffer_policy)
    if policy == "pretrained" or not task_vectors.buffer_tau:
        return {}
    if policy == "merged":
        return merge_buffers(task_vectors, coefficients)
    if params is None:
        return batch_statistics(task_vectors)
    if coefficients.ndim <= 2:
        return recompute_statistics(task_vectors, params)
    models = [recompute_statistics(task_vectors, {n: p[m] for n, p in params.items()})
              for m in range(coefficients.shape[0])]
    return {name: torch.stack([model[name] for model in models]) for name in models[0]}
