"""`TextSuite`: what every language-model suite serves, over per-task token splits (SPEC §3c).

A task is a language: its unlabeled text, tokenized into right-padded sequences (``input_ids [N, T]``,
``attention_mask [N, T]``), in three splits:

- ``train``: the adaptation text the merging methods train on (the next-token loss needs no labels: the text is its
  own target);
- ``val`` and ``test``: held-out text of the same language, scored by the next-token loss (nats per predicted token,
  padding masked; lower is better; `paretomerge.pareto.LOSS`).

Unlike the image suites, where adaptation runs on the test images without their labels, the adaptation text is kept
apart from the test text: a language model's "labels" are its text, so training on the test text would train on the
answers.

Subclasses (`TinyLMSuite`, `HFTextSuite`) provide ``tasks``, ``task_vectors()``, ``tokenizer()`` and
``token_split(task, split)``; this class turns them into Lightning's loaders, ``labeled(split)`` (MAP's evaluation
data), ``evaluate(net, split)`` (the fronts) and the build report of θ0, the individual models, Task Arithmetic and
TIES.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from paretomerge.kernels import TaskVectors
from paretomerge.kernels.inputs import inputs_to, split_rows
from paretomerge.objectives import next_token_loss_sum
from paretomerge.pareto import LOSS
from paretomerge.suites.loaders import derive_seed, epoch_shuffle

SPLITS = ("train", "val", "test")
Tokens = dict[str, Tensor]


def require_transformers(what: str) -> None:
    """Refuse, before anything is built, a language-model suite where Hugging Face ``transformers`` is missing."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"{what} needs Hugging Face transformers, which is not installed: pip install "
                          "'paretomerge[hf]' (or pip install transformers)")


class TokenDataset(Dataset):
    """Rows of a token split: item ``i`` is ``{"input_ids": [T], "attention_mask": [T]}``, so that a loader's batch is
    a token batch (a dict of ``[B, T]`` tensors, `paretomerge.kernels.inputs`)."""

    def __init__(self, tokens: Mapping[str, Tensor]) -> None:
        self.tokens = dict(tokens)

    def __len__(self) -> int:
        return int(self.tokens["input_ids"].shape[0])

    def __getitem__(self, index: int) -> Tokens:
        return {key: value[index] for key, value in self.tokens.items()}


class TextSuite(LightningDataModule):
    """Base of the language-model suites; see the module docstring. ``batch_size`` sequences per task per training
    step; ``eval_batch_size`` sequences per forward when scoring; ``seed`` keys the training order."""

    score = LOSS
    tasks: tuple[str, ...]

    def __init__(self, batch_size: int = 8, eval_batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                                 f"got {value!r}")
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self._report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what a subclass provides
    def task_vectors(self) -> TaskVectors:
        raise NotImplementedError

    def tokenizer(self) -> Any:
        """The tokenizer every model of the suite shares (a Hugging Face tokenizer: it is written beside exports)."""
        raise NotImplementedError

    def token_split(self, task: str, split: str) -> Tokens:
        """``{"input_ids": [N, T], "attention_mask": [N, T]}`` of one task's ``train``, ``val`` or ``test`` text."""
        raise NotImplementedError

    # ------------------------------------------------------------------ splits
    def _check_split(self, split: str, allowed: Sequence[str] = SPLITS) -> None:
        if split not in allowed:
            raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")

    def labeled(self, split: str = "val") -> dict[str, Tokens]:
        """task -> the token batch of ``split`` (a language model's text is its own label): MAP's evaluation data."""
        self._check_split(split, ("val", "test"))
        return {task: self.token_split(task, split) for task in self.tasks}

    # ------------------------------------------------------------------ Lightning's loaders
    def train_dataloader(self) -> CombinedLoader:
        """task -> token batches of ``batch_size`` sequences of the adaptation text, reshuffled every epoch by
        ``(seed, task, epoch)``; stateful, so a mid-epoch resume continues at the next batch."""
        loaders = {}
        for task in self.tasks:
            data = TokenDataset(self.token_split(task, "train"))
            if len(data) < self.batch_size:
                raise ValueError(f"task {task!r} has {len(data)} training sequences, fewer than batch_size="
                                 f"{self.batch_size}")
            loaders[task] = StatefulDataLoader(data, batch_size=self.batch_size, drop_last=True,
                                               sampler=epoch_shuffle(self, len(data), derive_seed(self.seed, task)))
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _labeled_loader(self, split: str) -> CombinedLoader:
        loaders = {t: DataLoader(TokenDataset(self.token_split(t, split)), batch_size=self.eval_batch_size)
                   for t in self.tasks}
        return CombinedLoader(loaders, mode="max_size")

    def val_dataloader(self) -> CombinedLoader:
        return self._labeled_loader("val")

    def test_dataloader(self) -> CombinedLoader:
        return self._labeled_loader("test")

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def evaluate(self, net: nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Per task, the next-token loss (nats per predicted token, over the whole split) of ``net(tokens, task=name)
        -> logits [B, T, V]`` (e.g. ``model.at(pref)``)."""
        self._check_split(split)
        unknown = [t for t in tasks or () if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this suite has {list(self.tasks)}")
        device = next(net.parameters()).device
        scores = {}
        for task in tasks or self.tasks:
            total, count = 0.0, 0
            for chunk in split_rows(self.token_split(task, split), self.eval_batch_size):
                chunk = inputs_to(chunk, device)
                chunk_total, chunk_count = next_token_loss_sum(net(chunk, task=task), chunk)
                total, count = total + float(chunk_total), count + chunk_count
            if count == 0:
                raise ValueError(f"task {task!r}: the {split} split has no token to predict")
            scores[task] = total / count
        return scores

    @property
    def build_report(self) -> dict[str, Any]:
        """Per task, the test loss of θ0 (``zero_shot_loss``), of the fine-tuned model on its own language
        (``individual_loss``), of Task Arithmetic (0.3), TIES and weight averaging; their means; computed once."""
        if self._report is None:
            self._report = self._compute_report()
        return self._report

    def _compute_report(self) -> dict[str, Any]:
        from paretomerge.front import individual_scores, static_point, zero_shot_scores

        tv = self.task_vectors()
        columns = {"zero_shot_loss": zero_shot_scores(tv, self), "individual_loss": individual_scores(tv, self)}
        for name in ("task_arithmetic", "ties", "weight_averaging"):
            columns[f"{name}_loss"] = static_point(name, tv, self)[0]
        per_task = {t: {column: float(values[k]) for column, values in columns.items()}
                    for k, t in enumerate(self.tasks)}
        mean = {column: float(values.mean()) for column, values in columns.items()}
        return {"tasks": per_task, "mean": mean}
