"""The exports. The compact one: a learned Pareto set as one safetensors file, and `load_pareto_set`, which needs no
Trainer. And one merged model, ``at(γ)``, as an ordinary open_clip or Hugging Face model (`export_model`).

"One model plus a low-rank part": the file holds the preference-independent base θ0 + Σλτ (the backbone's whole
state dict), the module's trainable state (λ, ω, the preference tensor's ``G``, ``A``, ``B``), ours' preference basis
(the truncated SVD factors of each task vector, `kernels.PreferenceBasis`), the heads, and a JSON config in the
safetensors metadata (how to rebuild the backbone and heads, the task names, the module's class and hyperparameters).
Tensor names:

    base/<parameter or buffer name>
    heads/<task index>/<key>
    buffers/tau/<float buffer name> | buffers/calibration   (a backbone with float buffers: `kernels.buffers`)
    preference/<target index>/G | A | B
    coefficients/lambdas | coefficients/omega
    basis/<merged layer name>                          (dense layers of the preference basis, [K, *shape])
    basis_left/<layer> | basis_right/<layer>           (factored layers: [m, K, r] and [n, K, r] int8 codes ...)
    basis_left_scale/<layer> | basis_right_scale/<layer>    (... and their scales, [K, r])

Loading rebuilds the module itself (`ParetoMerging`, `AdaMerging`) from the stored hyperparameters and restores it as
``load_from_checkpoint`` does (`MergingModule.restore`), so ``load_pareto_set(path).at(γ)`` *is*
``MergingModule.at``: the same θ(γ), built by the same `MergingModule.merged_parameters`. Files written before the
compact set (the full basis as ``basis/``, λ stored only with it) still load.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from paretomerge.kernels import MergedModel, PreferenceTensor, TaskVectors
from paretomerge.modules import checkpoint as ckpt
from paretomerge.modules.base import MergingModule
from paretomerge.modules.checkpoint import CheckpointError
from paretomerge.modules.formats import FORMATS, format_problem, model_formats, plan_model_files
from paretomerge.preferences import export_preference

FORMAT = "paretomerge.pareto_set/1"
# `PreferenceBasis.state`'s parts, and their names in the file
BASIS_PREFIXES = {"dense": "basis/", "left": "basis_left/", "right": "basis_right/", "left_scale": "basis_left_scale/",
                  "right_scale": "basis_right_scale/"}
METADATA_KEY = "paretomerge"


def export_pareto_set(module: MergingModule, path: str | os.PathLike) -> Path:
    """Write ``module``'s Pareto set to ``path`` (``.safetensors``), atomically; returns the path."""
    if not isinstance(module, MergingModule):
        raise TypeError(f"export_pareto_set needs a MergingModule (ParetoMerging, AdaMerging), got "
                        f"{type(module).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the export is a .safetensors file; got {str(path)!r}")
    tv = module._tv()
    missing = ckpt.unrecorded(tv)
    if missing:
        warnings.warn(f"export_pareto_set: {str(path)!r} {ckpt.missing_modules_message(missing, 'load_pareto_set')}",
                      stacklevel=2)
    # the same base, heads, specs and preference basis as a .ckpt holds
    section = ckpt.pack(tv, module.base_parameters(), module.preference_basis())
    tensors = {f"base/{name}": t for name, t in section["base"].items()}
    for part, prefix in BASIS_PREFIXES.items():
        tensors.update({prefix + name: t for name, t in section.get("preference_basis", {}).get(part, {}).items()})
    for index, task in enumerate(tv.task_names):
        tensors.update({f"heads/{index}/{key}": t for key, t in section["heads"][task].items()})
    buffers = section.get("buffers") or {}
    tensors.update({f"buffers/tau/{name}": t for name, t in buffers.get("tau", {}).items()})
    if buffers.get("calibration") is not None:
        tensors["buffers/calibration"] = buffers["calibration"]
    tensors.update({_export_name(key): t for key, t in _state_tensors(module).items()})
    pt: PreferenceTensor | None = getattr(module, "preference_tensor", None)
    config = {
        "format": FORMAT,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "preference_aware": module.preference_aware,
        "task_names": list(tv.task_names),
        "backbone_spec": section["backbone_spec"],
        "head_specs": [section["head_specs"][t] for t in tv.task_names],
        "backbone_class": section["backbone_class"],
        "head_classes": [section["head_classes"][t] for t in tv.task_names],
        "targets": [{"name": name, "shape": list(pt.shapes[name])} for name in pt.names] if pt is not None else [],
        "rank": pt.rank if pt is not None else None,
        "preference_coefficients": module.preference_conditioned,
        "basis_rank": module.hparams.get("basis_rank"),
        "buffer_policy": buffers.get("policy"),  # None: no float buffers
        "lambda_bounds": list(module.hparams.lambda_bounds) if module.hparams.get("lambda_bounds") else None,
        "hyper_parameters": json.loads(json.dumps(dict(module.hparams), default=str)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging),
                  metadata={METADATA_KEY: json.dumps(config)})
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _state_tensors(module: MergingModule) -> dict[str, Tensor]:
    """The module's trainable state (λ, ω, G, A, B), without the metrics' states."""
    return {key: t for key, t in module.state_dict().items() if not key.startswith("accuracy.")}


# the export's names for state-dict keys (the preference tensor's ``G.3`` is ``preference/3/G``)
_STATE_NAMES = {"lambdas": "coefficients/lambdas", "omega": "coefficients/omega"}
_TENSOR_KEY = re.compile(r"^preference_tensor\.([GAB])\.(\d+)$")


def _export_name(key: str) -> str:
    match = _TENSOR_KEY.match(key)
    return f"preference/{match.group(2)}/{match.group(1)}" if match else _STATE_NAMES.get(key, key)


class ParetoSet:
    """A loaded export: ``at(γ)`` gives the plain model for a preference (one model for AdaMerging exports). It holds
    the rebuilt module (``.module``), whose `MergingModule.at` it calls."""

    def __init__(self, module: MergingModule, config: dict[str, Any]) -> None:
        self.module, self.config = module, config

    @property
    def task_vectors(self) -> TaskVectors:
        return self.module.task_vectors

    @property
    def preference_tensor(self) -> PreferenceTensor | None:
        return getattr(self.module, "preference_tensor", None)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.task_vectors.task_names

    @property
    def preference_aware(self) -> bool:
        return self.module.preference_aware

    def at(self, preference: Sequence[float] | Tensor | None = None) -> MergedModel:
        """A plain eval-mode model with weights θ(γ) and the task heads; γ is validated and normalised."""
        return self.module.at(preference)

    def to(self, device: torch.device | str) -> ParetoSet:
        """Move everything to ``device`` in place; returns self."""
        self.module.to(device)
        return self

    def __repr__(self) -> str:
        kind = f"rank-{self.config['rank']} preference tensor" if self.preference_tensor is not None else "one model"
        if self.module.preference_conditioned:
            kind += f", basis_rank {self.config.get('basis_rank')!r}"
        if self.config.get("buffer_policy"):
            kind += f", BatchNorm statistics {self.config['buffer_policy']}"
        return f"ParetoSet(tasks={list(self.task_names)}, {kind}, module={self.config['module']})"


def _module_class(name: Any) -> type[MergingModule]:
    """The `MergingModule` subclass an export names, among those defined in this process (nothing is imported: a
    file does not get to run a package's import-time code)."""
    pending, seen = [MergingModule], {}
    while pending:
        cls = pending.pop()
        seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending.extend(cls.__subclasses__())
    if name not in seen:
        raise CheckpointError(f"the export was written by module {name!r}, which is not a MergingModule defined in "
                              "this process (import the module that defines it first)")
    return seen[name]


def load_pareto_set(path: str | os.PathLike, backbone: nn.Module | None = None,
                    heads: Mapping[str, nn.Module] | None = None) -> ParetoSet:
    """Read a file written by `export_pareto_set` (or ``paretomerge export``); refuses anything else.

    ``backbone`` and ``heads`` (task -> module) rebuild what the file could not record, as for
    ``ParetoMerging.load_from_checkpoint``: modules of the same class and shapes; copies of them get the weights.
    """
    ckpt.check_supplied_types(backbone, heads)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pareto set {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
    try:
        config = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a paretomerge export: it has no '{METADATA_KEY}' metadata "
                              "(write one with paretomerge export --ckpt X.ckpt --out file.safetensors)") from err
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: unsupported export format {config.get('format')!r}; expected {FORMAT}")
    try:
        names = list(config["task_names"])
        section = {  # the .ckpt section's shape, rebuilt by the same code
            "task_names": names, "backbone_spec": config["backbone_spec"],
            "head_specs": dict(zip(names, config["head_specs"], strict=True)),
            "backbone_class": config.get("backbone_class"),
            "head_classes": dict(zip(names, config.get("head_classes") or [None] * len(names), strict=True)),
            "base": _under(tensors, "base/"),
            "heads": {task: _under(tensors, f"heads/{index}/") for index, task in enumerate(names)},
            "preference_basis": {part: _under(tensors, prefix) for part, prefix in BASIS_PREFIXES.items()},
        }
        if not any(section["preference_basis"].values()):
            del section["preference_basis"]
        if config.get("buffer_policy"):
            section["buffers"] = {"policy": config["buffer_policy"], "tau": _under(tensors, "buffers/tau/"),
                                  "calibration": tensors.get("buffers/calibration")}
        cls = _module_class(config.get("module"))
        hparams = cls.upgrade_hyperparameters(dict(config.get("hyper_parameters") or {}))
        accepted = inspect.signature(cls.__init__).parameters
        module = cls(**{key: value for key, value in hparams.items() if key in accepted})
        saved = tensors.get("coefficients/lambdas", tensors.get("preference/0/G"))
        module.restore(section, loader="load_pareto_set", backbone=backbone, heads=heads,
                       state_dtype=None if saved is None else saved.dtype)
        own = _state_tensors(module)
        stored = {key: tensors[_export_name(key)] for key in own if _export_name(key) in tensors}
        # λ only matters beside a basis: files written before the compact set stored it only then
        missing = [key for key in own if key not in stored and (key != "lambdas" or module.preference_conditioned)]
        if missing:
            raise CheckpointError(f"{str(path)!r} has no {[_export_name(k) for k in missing]}")
        module.load_state_dict(stored, strict=False)
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot rebuild the Pareto set stored in {str(path)!r}: {err}") from err
    return ParetoSet(module.eval().requires_grad_(False), config)


def _under(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- one model
def export_model(module: MergingModule, out: str | os.PathLike, *, format: str,  # noqa: A002 (the CLI's word)
                 at: str | Sequence[float] | Tensor | None = None, tokenizer: Any = None,
                 class_names: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write ``module.at(at)``, the merged model at one preference with its task heads, to the directory ``out`` as an
    ordinary model of its own ecosystem, which loads where paretomerge is not installed (`modules.formats`):

    - ``format="open_clip"``: an open_clip image tower's state dict and model config;
    - ``format="hf"``: that tower as a ``CLIPVisionModelWithProjection``, a ``CLIPVisionModel`` as itself, or a causal
      LM as itself, with ``tokenizer`` (anything with ``save_pretrained``) beside it.

    Beside an image tower: ``heads.safetensors`` and ``heads.json`` (the tasks, ``class_names`` where given: task ->
    one name per class). README.md in ``out`` has the code that loads it. ``at`` is read by `export_preference` (not
    needed for a module whose model does not depend on it). Everything is checked before anything is written, and
    the directory appears whole or not at all (written beside ``out``, then renamed); ``out`` must not exist or be
    empty. Returns ``out``."""
    if not isinstance(module, MergingModule):
        raise TypeError(f"export_model needs a MergingModule (ParetoMerging, AdaMerging), got {type(module).__name__}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} exists and is not an empty directory; name a new one")
    tv = module._tv()
    tasks = list(tv.task_names)
    if at is None and module.preference_aware:
        raise ValueError(f"{type(module).__name__} gives one model per preference: give the preference, "
                         f"{len(tasks)} weights, one per task ({', '.join(tasks)}), 'equal' or a task's name")
    preference = None if at is None else export_preference(at, tasks)
    problem = format_problem(tv.backbone, tv.heads, format)
    if problem is not None:
        fitting = [*model_formats(tv.backbone, tv.heads), "pareto-set"]
        raise ValueError(f"format {format!r} does not fit this model: {problem}. The formats that fit it: "
                         f"{', '.join(fitting)}" + ("" if format in FORMATS else f" (of {[*FORMATS, 'pareto-set']})"))
    about = {"method": type(module).__name__,
             "preference": dict(zip(tasks, preference.tolist(), strict=True))
             if preference is not None and module.preference_aware else None}
    files = plan_model_files(module.at(preference), format, out, tokenizer=tokenizer, class_names=class_names,
                             about=about)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}")
    try:
        files.write(staging)
        if out.exists():
            out.rmdir()  # empty: checked above
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
