"""What one task's batch is, for the one forward: images, or a tokenized text batch.

- **Images**: a tensor ``[B, C, H, W]`` (or any tensor), the backbone's one positional argument.
- **Tokens**: a mapping of keyword tensors, as a Hugging Face tokenizer returns it: ``input_ids [B, T]`` (int64) and
  ``attention_mask [B, T]`` (1 for a token, 0 for padding; all ones when left out), passed to the backbone as keyword
  arguments. A causal LM's output for it is its logits ``[B, T, V]``; the next-token objectives
  (`paretomerge.objectives`) read the targets and the mask from the same mapping.

Batches of several tasks run as one backbone call: token batches of different lengths are right-padded to the longest
(padding masked) and each task's output is cut back to its own length, so the concatenation changes nothing a task
sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Tensor]


def is_tokens(inputs: Any) -> bool:
    """Whether ``inputs`` is a token batch (a mapping of keyword tensors) rather than an image tensor."""
    return isinstance(inputs, Mapping)


def check_tokens(inputs: Mapping[str, Any], where: str = "a token batch") -> Mapping[str, Tensor]:
    """Refuse a token batch without integer ``input_ids [B, T]``, or whose other tensors do not match its shape."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{where} must hold integer input_ids [B, T] (a tokenizer's output), got {got}")
    for key, value in inputs.items():
        if not isinstance(value, Tensor) or tuple(value.shape[:2]) != tuple(ids.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: {key!r} must be a tensor [B, T] = {tuple(ids.shape)} like input_ids, got {got}")
    return inputs


def attention_mask(inputs: Mapping[str, Tensor]) -> Tensor:
    """The batch's attention mask ``[B, T]`` (all ones when it has none)."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def num_rows(inputs: Inputs) -> int:
    """How many examples (images or sequences) a batch holds."""
    return int(inputs["input_ids"].shape[0] if is_tokens(inputs) else inputs.shape[0])


def inputs_to(inputs: Inputs, device: torch.device | str) -> Inputs:
    """The batch on ``device``."""
    return {k: v.to(device) for k, v in inputs.items()} if is_tokens(inputs) else inputs.to(device)


def split_rows(inputs: Inputs, size: int) -> list[Inputs]:
    """The batch in chunks of at most ``size`` examples (for evaluation)."""
    if not is_tokens(inputs):
        return list(inputs.split(size))
    chunks = {k: v.split(size) for k, v in inputs.items()}
    return [{k: chunks[k][i] for k in chunks} for i in range(len(chunks["input_ids"]))]


def arguments(module: nn.Module, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How ``module`` is called on ``inputs``: ``(images,)``, or the token batch as keyword arguments (without a
    key-value cache where the module keeps one, as a Hugging Face causal LM does: training and scoring never
    generate)."""
    if not is_tokens(inputs):
        return (inputs,), {}
    kwargs = dict(inputs)
    if getattr(getattr(module, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    return (), kwargs


def call(module: nn.Module, inputs: Inputs) -> Any:
    """``module(images)``, or ``module(**tokens)`` (`arguments`)."""
    args, kwargs = arguments(module, inputs)
    return module(*args, **kwargs)


def concatenate(batches: Sequence[Inputs]) -> tuple[Inputs, list[int], list[int | None]]:
    """Several tasks' batches as one: ``(inputs, rows per batch, sequence length per batch or None for images)``.
    Token batches are right-padded to the longest with 0 (masked by the attention mask, added where missing)."""
    sizes = [num_rows(b) for b in batches]
    if not all(is_tokens(b) for b in batches):
        if any(is_tokens(b) for b in batches):
            raise TypeError("one step's tasks must all be images or all be token batches")
        return torch.cat(list(batches)), sizes, [None] * len(batches)
    lengths = [int(b["input_ids"].shape[1]) for b in batches]
    longest = max(lengths)
    keys = list(dict.fromkeys(["attention_mask", *(k for b in batches for k in b)]))

    def padded(batch: Mapping[str, Tensor], key: str) -> Tensor:
        value = attention_mask(batch) if key == "attention_mask" else batch[key]
        return nn.functional.pad(value, (0, longest - value.shape[1])) if value.shape[1] < longest else value

    return {key: torch.cat([padded(b, key) for b in batches]) for key in keys}, sizes, lengths


def separate(output: Tensor, sizes: Sequence[int], lengths: Sequence[int | None]) -> list[Tensor]:
    """The inverse of `concatenate` on an output ``[B, ...]`` (``[B, T, ...]`` for tokens): each batch's rows, cut
    back to its own sequence length."""
    parts = output.split(list(sizes))
    return [part if length is None else part[:, :length] for part, length in zip(parts, lengths, strict=True)]
