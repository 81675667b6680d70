"""Closed-form merges (SPEC §5), registered by name: each is a small pure function from `TaskVectors` to merged
parameters, and each is a choice of task-wise coefficients (and of preprocessed task vectors) for the one
merge kernel, ``kernels.merge``.

    params = static_merge("ties", task_vectors, top_k=0.2)         # name -> tensor, every merged layer
    net = static_model("task_arithmetic_preference", task_vectors, preference=[0.7, 0.3])
    net(images, task="digit")

Names: ``weight_averaging``, ``task_arithmetic``, ``task_arithmetic_preference``, ``ties``,
``dare_task_arithmetic``, ``dare_ties`` (`STATIC_MERGES`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import MergedModel, TaskVectors, materialize, merge
from paretomerge.kernels.buffers import buffers_for
from paretomerge.preferences import validate_preference

TASK_ARITHMETIC_SCALE = 0.3
TIES_TOP_K = 0.2
TIES_AGGREGATES = ("sum", "mean")
DARE_DROP = 0.5

STATIC_MERGES: dict[str, Callable[..., dict[str, Tensor]]] = {}


def register(name: str) -> Callable[[Callable[..., dict[str, Tensor]]], Callable[..., dict[str, Tensor]]]:
    """Register a merge ``fn(task_vectors, **options) -> params`` under ``name``."""
    def add(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
        if name in STATIC_MERGES:
            raise ValueError(f"a static merge named {name!r} is already registered")
        STATIC_MERGES[name] = fn
        return fn
    return add


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def task_wise(task_vectors: TaskVectors, coefficients: Sequence[float] | Tensor,
              buffer_policy: str | None = None) -> dict[str, Tensor]:
    """θ0 + Σ_k c_k τ_k through the merge kernel, for task-wise coefficients ``c [K]`` (what every merge here,
    and MAP, chooses), with the float buffers of the task vectors' policy (or ``buffer_policy``) beside the merged
    layers (`kernels.buffers`; none for a backbone without float buffers)."""
    c = torch.as_tensor(coefficients, dtype=torch.float32, device=task_vectors.device)
    params = merge(task_vectors.theta0, task_vectors.tau, c)
    return params | buffers_for(task_vectors, c, params, buffer_policy)


@register("weight_averaging")
def weight_averaging(task_vectors: TaskVectors) -> dict[str, Tensor]:
    """θ0 + (1/K) Σ_k τ_k: the average of the fine-tuned models."""
    k = task_vectors.num_tasks
    return task_wise(task_vectors, [1.0 / k] * k)


@register("task_arithmetic")
def task_arithmetic(task_vectors: TaskVectors, scale: float = TASK_ARITHMETIC_SCALE) -> dict[str, Tensor]:
    """θ0 + s Σ_k τ_k."""
    return task_wise(task_vectors, [_check_scale(scale)] * task_vectors.num_tasks)


@register("task_arithmetic_preference")
def task_arithmetic_preference(task_vectors: TaskVectors, preference: Sequence[float] | Tensor,
                               scale: float = TASK_ARITHMETIC_SCALE) -> dict[str, Tensor]:
    """θ0 + s·K Σ_k γ_k τ_k, with γ the validated, normalised preference; the equal γ gives Task Arithmetic."""
    gamma = validate_preference(preference, task_vectors.num_tasks)
    return task_wise(task_vectors, _check_scale(scale) * task_vectors.num_tasks * gamma)


def _check_aggregate(aggregate: str) -> str:
    if aggregate not in TIES_AGGREGATES:
        raise ValueError(f"TIES aggregate must be 'sum' (disjoint sum, the reference implementations' default) or "
                         f"'mean' (the TIES paper's disjoint mean), got {aggregate!r}")
    return aggregate


@register("ties")
def ties(task_vectors: TaskVectors, scale: float = TASK_ARITHMETIC_SCALE, top_k: float = TIES_TOP_K,
         aggregate: str = "sum") -> dict[str, Tensor]:
    """TIES (Yadav et al.): trim each τ_k to its top ``top_k`` entries, elect signs, aggregate the entries that agree
    with the elected sign into τ_ties, then θ0 + s·τ_ties. ``aggregate="sum"`` is the disjoint sum that AdaMerging's
    ``main_ties_merging.py`` and FusionBench's TIES config run (``merge_func="dis-sum"``, the cited 72.4 on ViT-B/32);
    ``"mean"`` is the TIES paper's disjoint mean. Both are `TaskVectors.ties` merged at s for every task."""
    scale, aggregate = _check_scale(scale), _check_aggregate(aggregate)
    return task_arithmetic(task_vectors.ties(top_k, disjoint_mean=aggregate == "mean"), scale)


@register("dare_task_arithmetic")
def dare_task_arithmetic(task_vectors: TaskVectors, scale: float = TASK_ARITHMETIC_SCALE, drop: float = DARE_DROP,
                         seed: int = 0) -> dict[str, Tensor]:
    """DARE (Yu et al.) then Task Arithmetic: entries dropped with probability ``drop``, the rest rescaled."""
    scale = _check_scale(scale)
    return task_arithmetic(task_vectors.dare(drop, seed), scale)


@register("dare_ties")
def dare_ties(task_vectors: TaskVectors, scale: float = TASK_ARITHMETIC_SCALE, top_k: float = TIES_TOP_K,
              drop: float = DARE_DROP, seed: int = 0, aggregate: str = "sum") -> dict[str, Tensor]:
    """DARE then TIES (trim, elect, disjoint sum or mean as in `ties`) on the dropped-and-rescaled vectors, as in Yu
    et al."""
    scale, aggregate = _check_scale(scale), _check_aggregate(aggregate)
    return ties(task_vectors.dare(drop, seed), scale, top_k, aggregate)


def static_merge(name: str, task_vectors: TaskVectors, **options: Any) -> dict[str, Tensor]:
    """Merged parameters of the registered merge ``name``; unknown names and options are refused."""
    if name not in STATIC_MERGES:
        raise ValueError(f"unknown merge method {name!r}; choose from {sorted(STATIC_MERGES)}")
    if not isinstance(task_vectors, TaskVectors) or not task_vectors.has_task_vectors:
        raise TypeError(f"static merge {name!r} needs a TaskVectors with task vectors, got {task_vectors!r}")
    fn = STATIC_MERGES[name]
    accepted = [p for p in inspect.signature(fn).parameters if p != "task_vectors"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"merge {name!r} does not take {unknown}; it takes {accepted or 'no options'}")
    missing = [p.name for p in inspect.signature(fn).parameters.values()
               if p.name != "task_vectors" and p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise TypeError(f"merge {name!r} needs {', '.join(f'{m}=...' for m in missing)}")
    with torch.no_grad():
        return fn(task_vectors, **options)


def static_model(name: str, task_vectors: TaskVectors, **options: Any) -> MergedModel:
    """The registered merge ``name`` as an ordinary eval-mode model ``net(images, task=...)``."""
    return materialize(task_vectors, static_merge(name, task_vectors, **options))
