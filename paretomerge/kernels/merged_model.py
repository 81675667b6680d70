"""`MergedModel`: merged parameters written into an ordinary module (what ``at(...)`` and the static merges return)."""

from __future__ import annotations

import copy
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from paretomerge.kernels.inputs import Inputs, call
from paretomerge.kernels.merge import features_of, run_head
from paretomerge.kernels.task_vectors import TaskVectors


class MergedModel(nn.Module):
    """An ordinary model: ``net(images, task=name)`` = ``heads[name](backbone(images))``.

    A merged causal LM has no task heads (every head is an identity): ``net(tokens)`` (a token batch, `kernels.inputs`)
    gives its logits ``[B, T, V]`` for every task, ``net.backbone`` is the Hugging Face model itself (``generate()``
    works on it), and `save_pretrained` writes it as an ordinary Hugging Face directory."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    @property
    def headless(self) -> bool:
        """Whether every task's head is an identity: the backbone's output is every task's (a causal LM)."""
        return all(isinstance(head, nn.Identity) for head in self.heads.values())

    def forward(self, inputs: Inputs, task: str | None = None) -> Tensor:
        if task is None:
            if not self.headless:
                raise TypeError(f"this model has a head per task: call it as net(inputs, task=name), with name one of "
                                f"{list(self.task_names)}")
            return features_of(call(self.backbone, inputs))
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has tasks {list(self.task_names)}")
        return run_head(task, self.heads[task], features_of(call(self.backbone, inputs)))

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None, **options: Any) -> Path:
        """Write a merged Hugging Face model as an ordinary directory (``backbone.save_pretrained``, safetensors),
        with ``tokenizer`` (anything with ``save_pretrained``) beside it, so that
        ``AutoModelForCausalLM.from_pretrained(directory)`` loads it in a process that never imports paretomerge.
        ``options`` go to the backbone's ``save_pretrained`` (e.g. ``max_shard_size``). Refused for a model with task
        heads, which is not one Hugging Face model."""
        if not self.headless:
            raise TypeError("save_pretrained writes a model without task heads (a causal LM); this one has heads "
                            f"{[type(h).__name__ for h in self.heads.values()]}: save its state_dict() instead")
        if not callable(getattr(self.backbone, "save_pretrained", None)):
            raise TypeError(f"the backbone ({type(self.backbone).__name__}) is not a Hugging Face model: it has no "
                            "save_pretrained; save its state_dict() instead")
        if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(f"tokenizer must have save_pretrained (a Hugging Face tokenizer), got "
                            f"{type(tokenizer).__name__}")
        directory = Path(directory)
        self.backbone.save_pretrained(directory, **options)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory


@torch.no_grad()
def materialize(task_vectors: TaskVectors, params: Mapping[str, Tensor], owned: Collection[str] = ()) -> MergedModel:
    """A copy of the backbone holding ``params`` (one model, as `kernels.merge` returns, with the float buffers
    `kernels.buffers.buffers_for` gives beside them), with copies of the heads; eval mode, no gradients.

    ``params`` are copied, except those named in ``owned``: new tensors nothing else holds, which the model takes as
    they are. θ0's own parameters are never copied (a ``deepcopy`` memo puts the merged values in their place), so
    this costs about one ``deepcopy`` of the backbone.
    """
    own = dict(task_vectors.backbone.named_parameters())
    buffers = dict(task_vectors.backbone.named_buffers())
    memo: dict[int, Any] = {}
    for name, value in params.items():
        value = value.detach() if name in owned else value.detach().clone()
        if name in own:
            memo[id(own[name])] = nn.Parameter(value, requires_grad=False)
        else:
            memo[id(buffers[name])] = value
    backbone = copy.deepcopy(task_vectors.backbone, memo)
    return MergedModel(backbone, copy.deepcopy(task_vectors.heads)).eval().requires_grad_(False)
