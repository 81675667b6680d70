"""What a CLIP task's reader gives (`LabeledSplit`), the cleaning of metadata class names, and the error for data that
is not where it should be. Shared by the readers of `clip_data` (the eight tasks) and `clip_data_tall` (TALL's added
twelve)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Subset


class DatasetNotFoundError(FileNotFoundError):
    """A task's data is missing or incomplete under the data root."""


@dataclass(frozen=True)
class LabeledSplit:
    """One split of one task: ``dataset[i] -> (image, label)``, ``labels [N]`` (read without decoding images)."""

    dataset: Dataset
    labels: np.ndarray
    class_names: tuple[str, ...]

    def subset(self, indices: Sequence[int]) -> LabeledSplit:
        indices = list(indices)
        return LabeledSplit(Subset(self.dataset, indices), self.labels[indices], self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def clean_class_name(name: str) -> str:
    """``AnnualCrop`` -> ``Annual Crop``, ``apartment_building/outdoor`` -> ``apartment building outdoor``.
    (CLIP's tokenizer lower-cases, so case is left alone.) Names with spaces are not camel-split (``AM General``)."""
    if " " not in name:
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(re.sub(r"[_/]+", " ", name).split())
