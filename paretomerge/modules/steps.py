"""What every step does around a method's objective: reading a batch into per-task inputs and labels, and stopping
every process together on a non-finite loss."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from paretomerge.kernels.inputs import Inputs, check_tokens, is_tokens


def split_batch(batch: Any, task_names: Sequence[str], stage: str) -> dict[str, tuple[Inputs, Tensor | None]]:
    """task -> (inputs, labels or None) from a batch dict whose values are images, (images, labels, ...), or a token
    batch (a mapping with ``input_ids``, `kernels.inputs`: a language model's text, its own targets).

    Training (``stage="train"``) needs every task; evaluation takes the tasks present (a ``None`` value is an
    exhausted loader of ``CombinedLoader(..., mode="max_size")``) and needs labels for images.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{stage} batches must be dicts task -> images (train) or (images, labels) (val/test), got "
            f"{type(batch).__name__}; return CombinedLoader({{task: loader}}) from the dataloader hook"
        )
    unknown = [t for t in batch if t not in task_names]
    if unknown:
        raise KeyError(f"the {stage} batch has tasks {unknown} that the model does not know ({list(task_names)})")
    missing = [t for t in task_names if batch.get(t) is None]
    if stage == "train" and missing:
        raise KeyError(f"the training batch has no images for tasks {missing} (it has {list(batch)})")
    out = {}
    for task in task_names:
        value = batch.get(task)
        if value is None:
            continue
        if is_tokens(value):
            out[task] = (check_tokens(value, f"the {stage} batch of task {task!r}"), None)
            continue
        images, labels = (value[0], value[1] if len(value) > 1 else None) if isinstance(value, (list, tuple)) \
            else (value, None)
        if stage != "train" and labels is None:
            raise ValueError(f"the {stage} batch of task {task!r} has no labels; give (images, labels)")
        out[task] = (images, labels)
    if len({is_tokens(inputs) for inputs, _ in out.values()}) > 1:
        raise TypeError(f"the {stage} batch mixes images and token batches; every task of a model takes one kind")
    return out


def check_finite_loss(strategy: Strategy, loss: Tensor, f: Tensor, task_names: Sequence[str], step: int,
                      gamma: Tensor) -> None:
    """Raise `FloatingPointError` in every process when the loss is not finite in any of them, naming the step, the
    preference γ ``[K]`` and the tasks whose objective (``f [K]``, entropy or next-token loss) is not finite. Every
    process must stop together, or the others wait in the gradient all-reduce until a timeout."""
    finite = bool(torch.isfinite(loss))
    if strategy.reduce_boolean_decision(finite, all=True):
        return
    where = f"at step {step}, preference {[round(x, 4) for x in gamma.tolist()]}"
    if finite:
        raise FloatingPointError(f"non-finite loss in another process {where} of this one; see its error")
    bad = [t for t, v in zip(task_names, f.tolist(), strict=True) if not math.isfinite(v)]
    culprit = f"task objective not finite for {bad}" if bad else "task objectives are finite; a regulariser is not"
    raise FloatingPointError(f"non-finite loss {loss.item()} {where}: {culprit}")
