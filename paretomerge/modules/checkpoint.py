"""What a paretomerge `.ckpt` carries besides Lightning's own keys, and the checks made before trusting one.

The ``"paretomerge"`` section holds the preference-independent base θ0 + Σλτ (the whole backbone
state dict, with the merged layers replaced), the head weights, and how to rebuild both. It never holds
the stacked task vectors, so its size does not grow with K.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import ModuleSpec, TaskVectors

SECTION = "paretomerge"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is truncated, corrupt, of the wrong kind, or from another task set."""


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a missing, truncated or corrupt file before any unpickling (a `.ckpt` is a zip archive)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: it is truncated, corrupt, or not a torch.save "
            f"archive ({err})"
        ) from err
    if bad is not None:
        raise CheckpointError(f"{str(path)!r} is corrupt: its record {bad!r} fails the CRC check")


def inspect_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> None:
    """Refuse a file that is not a readable paretomerge `.ckpt`, before Lightning touches it.

    Tensors are memory-mapped, not read, so this costs one pass over the bytes for the CRC check.
    """
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{str(path)!r} holds pickled objects, which can run arbitrary code when loaded; it is refused under "
            "weights_only=True. Pass weights_only=False only if you trust its source."
        ) from err
    except (RuntimeError, ValueError, EOFError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {err}") from err
    if not isinstance(checkpoint, Mapping) or "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a paretomerge checkpoint: it is not a Lightning checkpoint")
    section_of(checkpoint)


def pack(task_vectors: TaskVectors, base: Mapping[str, Tensor]) -> dict[str, Any]:
    """The section to store: ``base`` replaces the merged layers of the backbone's state dict."""
    state = {name: t.detach().cpu() for name, t in task_vectors.backbone.state_dict().items()}
    state.update({name: t.detach().cpu() for name, t in base.items()})
    return {
        "format": FORMAT,
        "task_names": list(task_vectors.task_names),
        "layer_names": list(task_vectors.layer_names),
        "backbone_spec": task_vectors.backbone_spec.to_dict(),
        "head_specs": {t: s.to_dict() for t, s in task_vectors.head_specs.items()},
        "base": state,
        "heads": {
            t: {k: v.detach().cpu() for k, v in task_vectors.heads[t].state_dict().items()}
            for t in task_vectors.task_names
        },
    }


def section_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    section = checkpoint.get(SECTION)
    if not isinstance(section, Mapping):
        raise CheckpointError(
            "not a paretomerge checkpoint: it has no 'paretomerge' section (was it written by another "
            "LightningModule, or is it a plain state dict?)"
        )
    if section.get("format") != FORMAT:
        raise CheckpointError(f"unsupported paretomerge checkpoint format {section.get('format')!r}; expected {FORMAT}")
    return section


def unpack(section: Mapping[str, Any]) -> TaskVectors:
    """A base-only `TaskVectors` (no τ) rebuilt from the section, in a process that has nothing else."""
    try:
        names = list(section["task_names"])
        head_specs = {t: ModuleSpec.from_dict(section["head_specs"][t]) for t in names}
        return TaskVectors.base_only(
            ModuleSpec.from_dict(section["backbone_spec"]), section["base"], head_specs, section["heads"], names
        )
    except (KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's paretomerge section is incomplete or inconsistent: {err}") from err


def check_same_task_set(section: Mapping[str, Any], task_vectors: TaskVectors) -> None:
    """Refuse a checkpoint written for other tasks or another backbone than ``task_vectors``."""
    if list(section.get("task_names", [])) != list(task_vectors.task_names):
        raise CheckpointError(
            f"the checkpoint is from another task set: it has tasks {list(section.get('task_names', []))}, "
            f"the task vectors have {list(task_vectors.task_names)}"
        )
    theirs, ours = list(section.get("layer_names", [])), list(task_vectors.layer_names)
    if theirs != ours:
        first = next((a, b) for a, b in zip_longest(theirs, ours) if a != b)
        raise CheckpointError(f"the checkpoint is for another backbone: first differing layer {first}")
