"""`MergedModel`: merged parameters written into an ordinary module (what ``at(...)`` and the static merges return)."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from paretomerge.kernels.merge import features_of, run_head
from paretomerge.kernels.task_vectors import TaskVectors


class MergedModel(nn.Module):
    """An ordinary model: ``net(images, task=name)`` = ``heads[name](backbone(images))``."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def forward(self, images: Tensor, task: str) -> Tensor:
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has tasks {list(self.task_names)}")
        return run_head(task, self.heads[task], features_of(self.backbone(images)))


@torch.no_grad()
def materialize(task_vectors: TaskVectors, params: Mapping[str, Tensor], owned: Collection[str] = ()) -> MergedModel:
    """A copy of the backbone holding ``params`` (one model, as `kernels.merge` returns), with copies of the heads;
    eval mode, no gradients.

    ``params`` are copied, except those named in ``owned``: new tensors nothing else holds, which the model takes as
    they are. θ0's own parameters are never copied (a ``deepcopy`` memo puts the merged values in their place), so
    this costs about one ``deepcopy`` of the backbone.
    """
    own = dict(task_vectors.backbone.named_parameters())
    memo = {
        id(own[name]): nn.Parameter(value.detach() if name in owned else value.detach().clone(), requires_grad=False)
        for name, value in params.items()
    }
    backbone = copy.deepcopy(task_vectors.backbone, memo)
    return MergedModel(backbone, copy.deepcopy(task_vectors.heads)).eval().requires_grad_(False)
