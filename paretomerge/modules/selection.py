"""Choosing a preference for a task that has no fine-tuned model (SPEC §3, Pareto Merging paper §4.3): among
seeded Dirichlet preferences, the one whose merged model predicts the new task's unlabeled data with the lowest
mean entropy."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from paretomerge.kernels import MergedModel, forward_features, run_head
from paretomerge.modules.base import MergingModule
from paretomerge.objectives import entropy
from paretomerge.preferences import dirichlet_set
from paretomerge.progress import progress_bar


@dataclass
class UnseenTaskSelection:
    preference: Tensor   # [K], the chosen γ
    model: MergedModel   # at(γ) with the new task's head added under its name
    entropy: float       # its mean prediction entropy on the given images, nats
    preferences: Tensor  # [P, K], every candidate
    entropies: Tensor    # [P], their mean entropies


@torch.no_grad()
def select_for_unseen_task(module: MergingModule, images: Tensor, head: nn.Module, task: str = "unseen",
                           num_preferences: int = 30, seed: int = 0, alpha: float = 1.0, batch_size: int = 256,
                           progress: bool = True) -> UnseenTaskSelection:
    """Sample ``num_preferences`` γ ~ Dir(α·1) (seeded) and keep the one whose merged backbone, followed by
    ``head`` (features -> the new task's logits, e.g. a zero-shot text head), has the lowest mean entropy on
    ``images [N, C, H, W]`` (unlabeled). Ties go to the earlier candidate."""
    tv = module._tv()
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {shape}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module from features to logits, got {type(head).__name__}")
    if task in tv.task_names:
        raise ValueError(f"task {task!r} is one of the merged tasks {list(tv.task_names)}; name the new task")
    for name, value in (("num_preferences", num_preferences), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    head = copy.deepcopy(head).eval().requires_grad_(False).to(module.device)
    preferences = dirichlet_set(tv.num_tasks, num_preferences, seed, alpha)
    entropies = []
    for gamma in progress_bar(preferences, desc=f"scoring preferences on {task!r}", enabled=progress):
        params = module.merged_parameters(gamma.to(module.device))
        total = 0.0
        for chunk in images.split(batch_size):
            logits = run_head(task, head, forward_features(tv.backbone, params, chunk.to(module.device)))
            total += float(entropy(logits)) * chunk.shape[0]
        entropies.append(total / images.shape[0])
    entropies = torch.tensor(entropies, dtype=torch.float64)
    best = int(torch.argmin(entropies))
    model = module.at(preferences[best])
    model.heads[task] = head.cpu().to(next(model.parameters()).device)
    return UnseenTaskSelection(preferences[best], model, float(entropies[best]), preferences, entropies)
