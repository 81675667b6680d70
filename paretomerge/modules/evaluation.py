"""Per-task evaluation of a merging module at a few preferences, as torchmetrics, in the validation and test loops:
top-1 accuracy for labeled images, logged as ``{stage}/acc/{preference label}/{task}`` and ``.../mean``; for a
language model's token batches, the next-token loss (nats per token, averaged over tokens), logged as
``{stage}/loss/...``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from paretomerge.kernels import TaskVectors, check_labels
from paretomerge.kernels.inputs import is_tokens
from paretomerge.objectives import next_token_loss_sum
from paretomerge.preferences import equal_and_one_hots


class PerTaskEvaluation:
    """Mixed into `MergingModule` (a LightningModule): uses its ``accuracy`` (an ``nn.ModuleDict``), ``_tv()``,
    ``split_batch`` and forward ``self(images, γ)``."""

    accuracy: nn.ModuleDict  # stage -> [preference][task] MeanMetric: accuracy, or a language model's loss
    _evaluated = "acc"  # what the last evaluation step measured: "acc" or "loss"

    def evaluation_preferences(self, num_tasks: int) -> Tensor:
        """``[P, K]``: the equal preference and each one-hot."""
        return equal_and_one_hots(num_tasks)

    def preference_label(self, index: int) -> str:
        return "equal" if index == 0 else f"onehot_{self.task_vectors.task_names[index - 1]}"

    def _build_metrics(self, tv: TaskVectors) -> None:
        # Top-1 accuracy as the mean of correct predictions (torchmetrics syncs it across processes): it needs no class
        # count, which a head only tells by its output (`_evaluate_step` checks the labels against that).
        for stage in ("val", "test"):
            self.accuracy[stage] = nn.ModuleList(
                nn.ModuleList(MeanMetric() for _ in tv.task_names)
                for _ in range(self.evaluation_preferences(tv.num_tasks).shape[0])
            ).to(self.device)

    def _evaluate_step(self, batch: Mapping[str, Any], stage: str) -> None:
        tv = self._tv()
        labeled = self.split_batch(batch, tv.task_names, stage)
        if not labeled:
            return
        inputs = {t: x for t, (x, _) in labeled.items()}
        tokens = any(is_tokens(x) for x in inputs.values())
        self._evaluated = "loss" if tokens else "acc"
        preferences = self.evaluation_preferences(tv.num_tasks).to(self.device)
        for p, gamma in enumerate(preferences):
            logits = self(inputs, gamma)
            for k, task in enumerate(tv.task_names):
                if task not in labeled:
                    continue
                metric = self.accuracy[stage][p][k]
                if tokens:  # the mean over every predicted token of the split, not over batches
                    total, count = next_token_loss_sum(logits[task], inputs[task])
                    if count:
                        metric.update(total / count, weight=count)
                    continue
                labels = labeled[task][1]
                if p == 0:
                    check_labels(logits[task], labels, task)
                metric.update((logits[task].argmax(-1) == labels).float())

    def _evaluate_epoch_end(self, stage: str) -> None:
        tv = self._tv()
        for p, row in enumerate(self.accuracy[stage]):
            label = self.preference_label(p)
            values = [metric.compute() for metric in row]  # torchmetrics gathers every process's counts here
            # Already equal on every process; sync_dist averages equal values (a no-op) and keeps Lightning from
            # warning that epoch-level values are unsynced under DDP.
            for task, value in zip(tv.task_names, values, strict=True):
                self.log(f"{stage}/{self._evaluated}/{label}/{task}", value, sync_dist=True)
            self.log(f"{stage}/{self._evaluated}/{label}/mean", torch.stack(values).mean(), prog_bar=(p == 0),
                     sync_dist=True)
            for metric in row:
                metric.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluate_epoch_end("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluate_epoch_end("test")
