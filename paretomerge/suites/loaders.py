"""What every suite's loaders share: seeds derived from names, the resumable epoch shuffle, top-1 accuracy."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler
from torchmetrics import MeanMetric

from paretomerge.kernels import check_labels


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed derived from ``parts``; task names enter by name, so a task's data and weights do not
    depend on which other tasks are in the suite."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class EpochShuffle(Sampler[int]):
    """A new permutation every epoch, keyed by ``(seed, epoch)`` so a resumed run repeats the same order.
    Lightning calls ``set_epoch`` at the start of each training epoch."""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


@torch.no_grad()
def top1_accuracy(predict: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy (the fraction of argmax predictions equal to the label, as the modules log it) of
    ``predict(images) -> logits`` over ``batches``; the class count is the logits' width. Computed in this process
    alone: never all-gathered (under DDP, often only rank zero evaluates)."""
    metric = MeanMetric(sync_on_compute=False)
    for images, labels in batches:
        logits = predict(images)
        labels = labels.to(logits.device)
        check_labels(logits, labels)
        metric.update((logits.argmax(-1) == labels).float().cpu())
    return float(metric.compute())
