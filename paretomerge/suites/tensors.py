"""`TensorSuite`: your own task vectors and images as a suite, for models that are not the embedded or CLIP ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from paretomerge.kernels import TaskVectors
from paretomerge.suites.loaders import derive_seed, epoch_shuffle, top1_accuracy

SPLITS = ("val", "test")


class TensorSuite(LightningDataModule):
    """A datamodule over tensors you hold: ``task_vectors`` (e.g. `TaskVectors.from_models`), unlabeled training
    images per task, and labeled ``val``/``test`` images per task. It serves what the modules and callbacks ask of a
    suite: ``task_vectors()``, the loaders, ``labeled(split)`` (MAP) and ``evaluate(net, split)`` (the front logger).

    train: task -> images ``[N, ...]``; val, test: task -> (images, labels ``[N]``). Each has every task; val and test
    are optional (without ``val`` nothing is validated; without ``test``, ``test`` means ``val``). ``seed`` keys the
    training shuffle.
    """

    def __init__(self, task_vectors: TaskVectors, train: Mapping[str, Tensor],
                 val: Mapping[str, tuple[Tensor, Tensor]] | None = None,
                 test: Mapping[str, tuple[Tensor, Tensor]] | None = None,
                 batch_size: int = 16, eval_batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(task_vectors, TaskVectors):
            raise TypeError(f"task_vectors must be a TaskVectors, got {type(task_vectors).__name__}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.tasks = list(task_vectors.task_names)
        self._task_vectors = task_vectors
        self.train = self._check("train", train, labeled=False, every_task=True)
        self.splits = {"val": self._check("val", val, labeled=True, every_task=True) if val else {}}
        self.splits["test"] = self._check("test", test, labeled=True, every_task=True) if test else self.splits["val"]
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def _check(self, split: str, data: Mapping[str, object], labeled: bool, every_task: bool) -> dict:
        if not isinstance(data, Mapping):
            raise TypeError(f"{split} must be a dict task -> {'(images, labels)' if labeled else 'images'}")
        unknown = [t for t in data if t not in self.tasks]
        missing = [t for t in self.tasks if t not in data]
        if unknown or (every_task and missing):
            raise ValueError(f"{split} must have the tasks {self.tasks}; unknown {unknown}, missing {missing}")
        out = {}
        for task in self.tasks:
            if task not in data:
                continue
            value = data[task]
            if labeled and not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"{split}[{task!r}]: expected (images, labels), got {type(value).__name__}")
            images, labels = value if labeled else (value, None)
            if not isinstance(images, Tensor) or images.ndim < 2 or len(images) == 0:
                raise ValueError(f"{split}[{task!r}]: expected {'(images, labels)' if labeled else 'images'} with "
                                 f"images a non-empty tensor [N, ...], got {type(value).__name__}")
            if labeled and (not isinstance(labels, Tensor) or labels.shape != (len(images),)
                            or labels.is_floating_point()):
                raise ValueError(f"{split}[{task!r}]: labels must be an integer tensor [N={len(images)}]")
            out[task] = (images, labels) if labeled else images
        return out

    def task_vectors(self) -> TaskVectors:
        return self._task_vectors

    def train_dataloader(self) -> CombinedLoader:
        loaders = {t: StatefulDataLoader(TensorDataset(x), batch_size=self.batch_size,
                                 sampler=epoch_shuffle(self, len(x), derive_seed(self.seed, t)))
                   for t, x in self.train.items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _labeled_loader(self, split: str) -> CombinedLoader | list:
        data = self.splits[split]
        if not data:
            return []  # nothing to validate
        return CombinedLoader({t: DataLoader(TensorDataset(x, y), batch_size=self.eval_batch_size)
                               for t, (x, y) in data.items()}, mode="max_size")

    def val_dataloader(self) -> CombinedLoader | list:
        return self._labeled_loader("val")

    def test_dataloader(self) -> CombinedLoader | list:
        return self._labeled_loader("test")

    def labeled(self, split: str = "val") -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (images, labels) of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return dict(self.splits[split])

    def evaluate(self, net: nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per task of ``net(images, task=name) -> logits`` (e.g. ``model.at(pref)``) on ``split``."""
        data = self.labeled(split)
        unknown = [t for t in tasks or () if t not in data]
        if unknown:
            raise KeyError(f"no labeled {split} images for task(s) {unknown}; this suite has {list(data)}")
        device = next(net.parameters()).device
        return {task: top1_accuracy(lambda x, task=task: net(x.to(device), task=task),
                                    zip(data[task][0].split(self.eval_batch_size),
                                        data[task][1].split(self.eval_batch_size), strict=True))
                for task in tasks or data}
