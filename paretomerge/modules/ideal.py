"""The ideal point z of the smooth-Tchebycheff scalarisation, STCH_μ(f; γ) = μ·logsumexp_k(γ_k (f_k − z_k)/μ).

- ``zero`` (SPEC §3): z = 0, the minimum of an entropy.
- ``individual`` (ours, beyond SPEC: docs/method.md, "The ideal point"): z_k = task k's objective under its own
  fine-tuned model θ0 + τ_k, on the first batches of its adaptation data: the best value known to be attainable for
  the task. A language model's next-token loss has no attainable zero (a language's text keeps its own entropy), so
  with z = 0 the scalarisation at the equal preference would mostly serve the task with the highest absolute loss;
  against the individual models it balances what each task has lost by merging. The default for the loss objective.

The point is measured once per fit, when it starts, on the first `IDEAL_BATCHES` batches of a fresh training loader
of the datamodule (the same batches on a resumed fit, so a resume stays exact), averaged over the processes; without
a datamodule, on the first training batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import TaskVectors, forward_features, merge, run_head
from paretomerge.objectives import task_objectives

IDEALS = ("zero", "individual")
#: Training batches the individual models' objective is averaged over.
IDEAL_BATCHES = 8


def check_ideal(ideal: str | None) -> str | None:
    if ideal is not None and ideal not in IDEALS:
        raise ValueError(f"ideal must be one of {IDEALS} or None (the objective's: individual for the next-token "
                         f"loss, zero for the entropy), got {ideal!r}")
    return ideal


def resolve_ideal(ideal: str | None, objective: str) -> str:
    """The ideal point asked for, else the objective's: ``individual`` for the loss, ``zero`` for the entropy."""
    return ideal or ("individual" if objective == "loss" else "zero")


@torch.no_grad()
def individual_objectives(tv: TaskVectors, batches: Iterable[Mapping[str, Any]], objective: str) -> Tensor:
    """``[K]``: each task's mean objective under θ0 + τ_k over ``batches`` (task -> its inputs), in θ0's dtype's
    float32 at least; one individual model is merged at a time."""
    batches = list(batches)
    values = []
    for k, task in enumerate(tv.task_names):
        params = merge(tv.theta0, tv.tau, torch.eye(tv.num_tasks, device=tv.device)[k])
        total = torch.zeros((), dtype=torch.float64, device=tv.device)
        for batch in batches:
            inputs = batch[task]
            logits = run_head(task, tv.heads[task], forward_features(tv.backbone, params, inputs))
            total += task_objectives({task: logits}, [task], objective, 0.0, {task: inputs})["f"][0].double()
        values.append(total / len(batches))
        del params
    return torch.stack(values).float()


def first_batches(loader: Any, count: int) -> list[Any]:
    """The first ``count`` batches of a fresh iterator of ``loader`` (a ``CombinedLoader`` yields ``(batch, index,
    loader index)``)."""
    out = []
    for item in loader:
        out.append(item[0] if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], Mapping) else item)
        if len(out) == count:
            break
    return out
