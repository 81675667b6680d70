"""What a paretomerge `.ckpt` carries besides Lightning's own keys, and the checks made before trusting one.

The ``"paretomerge"`` section holds the preference-independent base θ0 + Σλτ (the whole backbone state dict, with
the merged layers replaced), the head weights, and how to rebuild both. For the paper's Pareto Merging (and AdaMerging)
that is all ``at(γ)`` needs, and its size does not grow with K. With preference-conditioned coefficients (ours) the
section also holds ``preference_basis``, the basis τ̃ that c(γ) − λ multiplies (`kernels.PreferenceBasis`): ``at(γ)``
adds Σ_k (c_k(γ) − λ_k) τ̃_k to the base. Truncated (the default ``basis_rank``), it costs a fraction of one backbone;
the full basis (``basis_rank=None``, and every checkpoint written before it, as ``basis``) costs K more backbones
(benchmarks/bench_compact.py). A backbone with float buffers adds ``buffers``: the policy, each float buffer's
``b_k − b0`` and the calibration inputs (`kernels.buffers`), so that ``at(γ)`` rebuilds them as the fit did.

A backbone or head that is not a recognised builder's (`kernels.builders.recognise`) is recorded by its class only;
loading then takes the module itself: ``load_from_checkpoint(path, backbone=..., heads={...})`` (`supplied_modules`),
checked against the stored names and shapes before anything is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from paretomerge.kernels import ModuleSpec, PreferenceBasis, TaskVectors, merge
from paretomerge.kernels.builders import class_name, shape_difference

SECTION = "paretomerge"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is truncated, corrupt, of the wrong kind, or from another task set."""


class MissingModulesError(CheckpointError):
    """A checkpoint whose backbone or heads cannot be rebuilt from it, loaded without ``backbone=`` / ``heads=``."""


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


def pack(task_vectors: TaskVectors, base: Mapping[str, Tensor], basis: PreferenceBasis | None = None) -> dict[str, Any]:
    """The section to store: ``base`` replaces the merged layers of the backbone's state dict. ``basis`` (ours: the
    preference basis τ̃ that c(γ) − λ multiplies, `PreferenceBasis.state`) is kept when the model's coefficients
    depend on the preference: ``at(γ)`` adds Σ_k (c_k(γ) − λ_k) τ̃_k to the base."""
    state = {name: t.detach().cpu() for name, t in task_vectors.backbone.state_dict().items()}
    state.update({name: base[layer].detach().cpu() for name, layer in _tied_names(task_vectors.backbone, base)})
    section = {
        "format": FORMAT,
        "task_names": list(task_vectors.task_names),
        "layer_names": list(task_vectors.layer_names),
        "backbone_spec": _record(task_vectors.backbone_spec),
        "head_specs": {t: _record(s) for t, s in task_vectors.head_specs.items()},
        "backbone_class": class_name(task_vectors.backbone),
        "head_classes": {t: class_name(h) for t, h in task_vectors.heads.items()},
        "base": state,
        "heads": {
            t: {k: v.detach().cpu() for k, v in task_vectors.heads[t].state_dict().items()}
            for t in task_vectors.task_names
        },
    }
    if basis is not None:
        section["preference_basis"] = basis.state()
    if task_vectors.buffer_tau:  # the float-buffer policy, b_k − b0 and the calibration inputs: at(γ) redoes them
        section["buffers"] = {
            "policy": task_vectors.buffer_policy,
            "tau": {name: t.detach().cpu() for name, t in task_vectors.buffer_tau.items()},
            "calibration": None if task_vectors.calibration is None else task_vectors.calibration.detach().cpu(),
        }
    return section


def _tied_names(backbone: nn.Module, base: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """``(state-dict name, merged layer)`` for every name of a merged layer, its tied aliases included (a causal LM's
    ``lm_head.weight`` is ``model.embed_tokens.weight``): the stored base gives every alias the merged value, so that
    loading, which writes them in turn into one tensor, cannot leave θ0's value in it."""
    layer_of = {id(p): name for name, p in backbone.named_parameters() if name in base}
    return [(name, layer_of[id(p)]) for name, p in backbone.named_parameters(remove_duplicate=False)
            if id(p) in layer_of]


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


def _record(spec: ModuleSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.to_dict()


def unrecorded(task_vectors: TaskVectors) -> dict[str, Any]:
    """What a checkpoint of these task vectors cannot rebuild by itself: ``{"backbone": class name}`` if the backbone
    is not a recognised builder's, ``{"heads": {task: class name}}`` for such heads; empty when it needs nothing."""
    missing: dict[str, Any] = {}
    if task_vectors.backbone_spec is None:
        missing["backbone"] = class_name(task_vectors.backbone)
    heads = {t: class_name(task_vectors.heads[t]) for t, s in task_vectors.head_specs.items() if s is None}
    if heads:
        missing["heads"] = heads
    return missing


def missing_modules_message(missing: Mapping[str, Any], loader: str) -> str:
    """What saving warns and loading raises for ``missing`` (as `unrecorded`): what cannot be rebuilt, and the call of
    ``loader`` that supplies it."""
    return (f"records no way to rebuild {' and '.join(_describe_missing(missing))} (not a recognised builder's); "
            f"loading it needs {_needs_message(missing, loader)}")


def _needs_message(missing: Mapping[str, Any], loader: str) -> str:
    """``missing`` (as `unrecorded`) said as the keyword arguments ``loader`` needs."""
    parts = []
    if "backbone" in missing:
        parts.append(f"backbone=<{missing['backbone']}>")
    if "heads" in missing:
        parts.append("heads={" + ", ".join(f"{t!r}: <{c}>" for t, c in missing["heads"].items()) + "}")
    return f"{loader}(path, {', '.join(parts)})"


_SUPPLIED: ContextVar[dict[str, Any] | None] = ContextVar("paretomerge_supplied_modules", default=None)


@contextlib.contextmanager
def supplied_modules(backbone: nn.Module | None, heads: Mapping[str, nn.Module] | None) -> Iterator[None]:
    """Make ``backbone`` and ``heads`` (given to ``load_from_checkpoint``) available to `unpack` inside the block:
    Lightning passes a loader's extra kwargs to the constructor, which has no use for modules."""
    check_supplied_types(backbone, heads)
    token = _SUPPLIED.set({"backbone": backbone, "heads": dict(heads or {})})
    try:
        yield
    finally:
        _SUPPLIED.reset(token)


def check_supplied_types(backbone: Any, heads: Any) -> None:
    if backbone is not None and not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone= must be an nn.Module, got {type(backbone).__name__}")
    if heads is not None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads= must be a dict task -> nn.Module, got {type(heads).__name__}")
        for task, head in heads.items():
            if not isinstance(head, nn.Module):
                raise TypeError(f"heads[{task!r}] must be an nn.Module, got {type(head).__name__}")


def _check_given(what: str, module: nn.Module, recorded_class: str | None, state: Mapping[str, Tensor]) -> None:
    """Refuse a supplied module of another class, or with other parameter names or shapes, naming the first
    difference. Classes are compared by name, not module path (``__main__.Net`` in a notebook is ``mypkg.Net``)."""
    got = class_name(module)
    if recorded_class is not None and got.rsplit(".", 1)[-1] != recorded_class.rsplit(".", 1)[-1]:
        raise CheckpointError(f"{what} is a {got}, but the checkpoint's is a {recorded_class}")
    difference = shape_difference(state, module.state_dict())
    if difference is not None:
        name, theirs, ours = difference
        if ours is None:
            raise CheckpointError(f"{what} ({got}) has no {name!r}, which the checkpoint has (another architecture?)")
        if theirs is None:
            raise CheckpointError(f"{what} ({got}) has {name!r}, which the checkpoint does not (another architecture?)")
        raise CheckpointError(f"{what} ({got}): {name!r} has shape {ours} but {theirs} in the checkpoint")


def unpack(section: Mapping[str, Any], backbone: nn.Module | None = None,
           heads: Mapping[str, nn.Module] | None = None, loader: str = "load_from_checkpoint") -> TaskVectors:
    """A base-only `TaskVectors` (no τ) rebuilt from the section, in a process that has nothing else.

    ``backbone`` and ``heads`` (task -> module; by default those of `supplied_modules`) replace what the section cannot
    rebuild by itself, or what it could; they are checked against the stored weights' names and shapes first, then
    copied (the caller's modules are left as they are) and loaded. Nothing is built or loaded before every check has
    passed. ``loader`` names the function for the messages.
    """
    supplied = _SUPPLIED.get() or {}  # `supplied_modules` checked their types; `load_pareto_set` checks its own
    backbone = backbone if backbone is not None else supplied.get("backbone")
    heads = dict(heads if heads is not None else supplied.get("heads") or {})
    try:
        names = list(section["task_names"])
        backbone_record, head_records = section["backbone_spec"], section["head_specs"]
        classes = section.get("head_classes", {})
        missing: dict[str, Any] = {}
        if backbone is None and backbone_record is None:
            missing["backbone"] = section.get("backbone_class", "the backbone class it was trained with")
        missing_heads = {t: classes.get(t, "head") for t in names if t not in heads and head_records[t] is None}
        if missing_heads:
            missing["heads"] = missing_heads
        if missing:
            raise MissingModulesError(f"this checkpoint {missing_modules_message(missing, loader)}, with modules of "
                                      "that architecture (the checkpoint's weights are loaded into copies of them)")
        unknown = [t for t in heads if t not in names]
        if unknown:
            raise CheckpointError(f"heads= has tasks {unknown} that this checkpoint does not have (it has {names})")
        if backbone is not None:
            _check_given("backbone=", backbone, section.get("backbone_class"), section["base"])
        for task, head in heads.items():
            _check_given(f"heads[{task!r}]", head, classes.get(task), section["heads"][task])
        specs = {t: None if head_records[t] is None else ModuleSpec.from_dict(head_records[t]) for t in names}
        backbone_spec = None if backbone_record is None else ModuleSpec.from_dict(backbone_record)
        built = copy.deepcopy(backbone) if backbone is not None else backbone_spec.build()
        built.to(stored_dtype(section)).load_state_dict(section["base"], strict=True)  # float64 stays float64
        rebuilt_heads = {}
        for task in names:
            head = copy.deepcopy(heads[task]) if task in heads else specs[task].build()
            head.to(stored_dtype(section)).load_state_dict(section["heads"][task], strict=True)
            rebuilt_heads[task] = head
        buffers = section.get("buffers") or {}  # none before the policy existed: θ0's buffers, as then
        return TaskVectors(built, None, rebuilt_heads, names, backbone_spec, specs, buffer_tau=buffers.get("tau"),
                           buffer_policy=buffers.get("policy", "pretrained"), calibration=buffers.get("calibration"))
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot rebuild the model recorded in the checkpoint: {err}") from err


def stored_dtype(section: Mapping[str, Any]) -> torch.dtype:
    """The floating dtype the model was saved in (that of its stored base)."""
    return next((t.dtype for t in section["base"].values() if t.is_floating_point()), torch.get_default_dtype())


def _describe_missing(missing: Mapping[str, Any]) -> list[str]:
    out = []
    if "backbone" in missing:
        out.append(f"its backbone ({missing['backbone']})")
    if "heads" in missing:
        out.append(f"the heads of tasks {list(missing['heads'])}")
    return out


def unpack_basis(section: Mapping[str, Any], task_vectors: TaskVectors,
                 rank: int | float | None) -> PreferenceBasis | None:
    """The section's preference basis (None if it has none), checked against the rebuilt model's merged layers and
    the layout ``rank`` gives them, and moved to its device. A section written before the compact set holds the full
    basis as ``basis`` (name -> ``[K, *shape]``). Damaged or missing factors raise `CheckpointError` naming the
    layer."""
    if "preference_basis" in section:
        state = section["preference_basis"]
    elif "basis" in section:
        state = {"dense": section["basis"]}
    else:
        return None
    theta0 = task_vectors.theta0
    shapes = {name: tuple(theta0[name].shape) for name in task_vectors.layer_names}
    try:
        if not isinstance(state, Mapping):
            raise ValueError(f"it is a {type(state).__name__}, not a dict")
        basis = PreferenceBasis.from_state(state, shapes, task_vectors.num_tasks, rank)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint's preference basis (basis_rank={rank!r}) is damaged or incomplete: "
                              f"{err}") from err
    device = task_vectors.device
    return basis.apply_(lambda t: t.to(device))


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
    difference = shape_difference(expected["shapes"], got["shapes"])
    if difference is not None:
        name, theirs, ours = difference
        raise CheckpointError(f"{source} is for another architecture: backbone parameter {name!r} is {theirs} there "
                              f"but {ours} in the task vectors")
    for task in dict.fromkeys([*expected["heads"], *got["heads"]]):
        theirs, ours = expected["heads"].get(task), got["heads"].get(task)
        if theirs != ours:
            raise CheckpointError(f"{source} is for another architecture: head of task {task!r} is {theirs} there but "
                                  f"{ours} in the task vectors")


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but a local checkpoint is written to a temporary file beside it, flushed to
    disk, then renamed over the target (``os.replace``, atomic on one filesystem): a process killed while writing
    leaves the previous checkpoint whole and never a half-written one under its name.

    Lightning's own save goes through an fsspec transaction whose temporary file is made by ``tempfile.mkstemp()`` in
    the system's temporary directory, then moved: a rename where that is on the checkpoint's filesystem, a copy (not
    atomic) where it is not. Remote paths (``s3://``...) are left to Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(staging, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
