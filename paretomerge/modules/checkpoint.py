"""What a paretomerge `.ckpt` carries besides Lightning's own keys, and the checks made before trusting one.

The ``"paretomerge"`` section holds the preference-independent base θ0 + Σλτ (the whole backbone state dict, with
the merged layers replaced), the head weights, and how to rebuild both. For the paper's Pareto Merging (and AdaMerging)
that is all ``at(γ)`` needs, and its size does not grow with K. With preference-conditioned coefficients (ours) the
section also holds ``basis``, the stacked task vectors: ``at(γ)`` adds Σ_k (c_k(γ) − λ_k) τ_k to the base, which
costs K more backbones of storage in τ's dtype (benchmarks/bench_checkpoint_size.py).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from paretomerge.kernels import ModuleSpec, TaskVectors, merge

SECTION = "paretomerge"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is truncated, corrupt, of the wrong kind, or from another task set."""


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a missing, truncated or corrupt file before any unpickling (a `.ckpt` is a zip archive)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
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

    Tensors are memory-mapped, not read, so this costs one pass over the bytes for the CRC check. URLs and
    directories (sharded checkpoints) are left to Lightning; ``on_load_checkpoint`` still checks the section.
    """
    if "://" in str(path) or Path(path).is_dir():
        return
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


def pack(task_vectors: TaskVectors, base: Mapping[str, Tensor],
         basis: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """The section to store: ``base`` replaces the merged layers of the backbone's state dict. ``basis`` (the task
    vectors, name -> ``[K, *shape]``, stored in their own dtype) is kept when the model's coefficients depend on the
    preference: ``at(γ)`` adds Σ_k (c_k(γ) − λ_k) τ_k to the base, so it cannot be rebuilt from the base alone."""
    state = {name: t.detach().cpu() for name, t in task_vectors.backbone.state_dict().items()}
    state.update({name: t.detach().cpu() for name, t in base.items()})
    section = {
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
    if basis is not None:
        section["basis"] = {name: t.detach().cpu() for name, t in basis.items()}
    return section


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
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot rebuild the model recorded in the checkpoint: {err}") from err


def unpack_basis(section: Mapping[str, Any], task_vectors: TaskVectors) -> dict[str, Tensor] | None:
    """The section's basis (None if it has none), checked against the rebuilt model and moved to its device."""
    basis = section.get("basis")
    if basis is None:
        return None
    layers, num_tasks = list(task_vectors.layer_names), task_vectors.num_tasks
    theta0 = task_vectors.theta0
    if sorted(basis) != sorted(layers) or any(
            tuple(basis[n].shape) != (num_tasks, *theta0[n].shape) for n in layers):
        raise CheckpointError("the checkpoint's basis (its task vectors) does not match its model's merged layers")
    return {name: basis[name].to(task_vectors.device) for name in layers}


def signature(task_vectors: TaskVectors) -> dict[str, Any]:
    """What must match for two sets of task vectors (or a checkpoint) to be interchangeable."""
    return {
        "task_names": list(task_vectors.task_names),
        "shapes": {k: tuple(v.shape) for k, v in task_vectors.backbone.state_dict().items()},
        "heads": {t: {k: tuple(v.shape) for k, v in h.state_dict().items()} for t, h in task_vectors.heads.items()},
    }


def section_signature(section: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "task_names": list(section.get("task_names", [])),
        "shapes": {k: tuple(v.shape) for k, v in section.get("base", {}).items()},
        "heads": {t: {k: tuple(v.shape) for k, v in h.items()} for t, h in section.get("heads", {}).items()},
    }


def check_compatible(expected: Mapping[str, Any], task_vectors: TaskVectors, source: str) -> None:
    """Refuse task vectors whose tasks, backbone or heads differ from ``expected`` (a `signature`), naming
    the first difference. ``source`` says where ``expected`` came from, for the message."""
    got = signature(task_vectors)
    if expected["task_names"] != got["task_names"]:
        raise CheckpointError(
            f"{source} is from another task set: it has tasks {expected['task_names']}, the task vectors have "
            f"{got['task_names']}"
        )
    for what in ("shapes", "heads"):
        for name in dict.fromkeys([*expected[what], *got[what]]):
            theirs, ours = expected[what].get(name), got[what].get(name)
            if theirs != ours:
                part = "backbone parameter" if what == "shapes" else "head of task"
                raise CheckpointError(
                    f"{source} is for another architecture: {part} {name!r} is {theirs} there but {ours} in the "
                    "task vectors"
                )


def check_same_weights(section: Mapping[str, Any], task_vectors: TaskVectors, lambdas: Tensor) -> None:
    """On resume: θ0 + Σλτ from these task vectors must reproduce the checkpoint's stored base."""
    with torch.no_grad():
        base = merge(task_vectors.theta0, task_vectors.tau, lambdas.to(task_vectors.device))
    stored = section["base"]
    for name in task_vectors.layer_names:
        ours, theirs = base[name].detach().cpu(), stored[name].to(base[name].dtype)
        if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
            gap = float((ours - theirs).abs().max())
            raise CheckpointError(
                f"the task vectors differ from the ones this checkpoint was trained with: θ0 + Σλτ differs from "
                f"the stored base at layer {name!r} by up to {gap:.3g}"
            )
    for task, head in task_vectors.heads.items():
        for key, value in head.state_dict().items():
            if not torch.allclose(value.detach().cpu(), section["heads"][task][key].to(value.dtype)):
                raise CheckpointError(f"the head of task {task!r} differs from the checkpoint's ({key!r})")
