"""What every suite's loaders share: seeds derived from names, the resumable epoch shuffle, top-1 accuracy."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric

from paretomerge.kernels import check_labels


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed derived from ``parts``; task names enter by name, so a task's data and weights do not
    depend on which other tasks are in the suite."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class EpochShuffle(DistributedSampler):
    """A new permutation every epoch, keyed by ``(seed, epoch)`` so a resumed run repeats the same order; under DDP
    each of ``num_replicas`` processes takes every ``num_replicas``-th index from ``rank`` (the permutation padded, as
    ``DistributedSampler`` pads it, to a multiple of ``num_replicas``). Lightning calls ``set_epoch`` at the start of
    each training epoch.

    Stateful (``state_dict``/``load_state_dict``: the epoch and how many indices this pass has given), so a torchdata
    ``StatefulDataLoader`` over it resumes mid-epoch at the next index, in that epoch's order. It is a
    ``DistributedSampler`` so that Lightning does not wrap it under DDP: the wrapper it uses otherwise keeps no state.
    """

    def __init__(self, num_items: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ wants a dataset and a process group; this needs neither.
        self.num_items, self.seed, self.epoch = num_items, seed, 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = -(-num_items // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._given = 0  # indices the current pass has given
        self._skip = 0  # indices the next pass skips (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # a restored position belongs to the restored epoch only
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator).tolist()
        order = (order * -(-self.total_size // max(len(order), 1)))[:self.total_size][self.rank::self.num_replicas]
        skip, self._skip, self._given = self._skip, 0, self._skip
        for index in order[skip:]:
            self._given += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "given": self._given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip, self._given = int(state["epoch"]), int(state["given"]), int(state["given"])


def epoch_shuffle(datamodule: Any, num_items: int, seed: int) -> EpochShuffle:
    """An `EpochShuffle` for ``datamodule``'s training loader: this process's share when its trainer runs several."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return EpochShuffle(num_items, seed)
    return EpochShuffle(num_items, seed, trainer.world_size, trainer.global_rank)


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
