"""The compact export: a learned Pareto set as one safetensors file, and `load_pareto_set`, which needs no Lightning.

"One model plus a low-rank tensor": the file holds the preference-independent base θ0 + Σλτ (the backbone's
whole state dict), the preference tensor (``G``, ``A``, ``B`` per target), the heads, and a JSON config in the
safetensors metadata (how to rebuild the backbone and heads, the task names, the targets, the module's
hyperparameters). Tensor names:

    base/<parameter or buffer name>
    heads/<task index>/<key>
    preference/<target index>/G | A | B
    coefficients/lambdas | coefficients/omega       (preference-conditioned coefficients only)
    basis/<merged layer name>                        (the same: the task vectors, [K, *shape])

With preference-conditioned coefficients (ours, `ParetoMerging`'s default) ``at(γ)`` adds Σ_k (c_k(γ) − λ_k) τ_k to the
base, so the file also holds the task vectors it was trained with: about (1 + K)× one backbone instead of 1×
(benchmarks/bench_checkpoint_size.py).

The base, heads and specs are those of a `.ckpt`'s section (`checkpoint.pack` / `checkpoint.unpack`), and
``load_pareto_set(path).at(γ)`` runs the same kernels as ``ParetoMerging.load_from_checkpoint(...).at(γ)``
(`kernels.merge` of the stored base and Δ(γ), then `kernels.materialize`), so the two give identical models. Loading
needs no Trainer and no Lightning checkpoint machinery.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from paretomerge.kernels import MergedModel, PreferenceTensor, TaskVectors, materialize, merge, preference_coefficients
from paretomerge.modules import checkpoint as ckpt
from paretomerge.modules.base import MergingModule
from paretomerge.modules.checkpoint import CheckpointError
from paretomerge.preferences import preference_for

FORMAT = "paretomerge.pareto_set/1"
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
    # the same base, heads, specs (and basis) as a .ckpt holds
    section = ckpt.pack(tv, module.base_parameters(), module.coefficient_basis())
    tensors = {f"base/{name}": t for name, t in section["base"].items()}
    if "basis" in section:
        tensors.update({f"basis/{name}": t for name, t in section["basis"].items()})
        tensors.update({"coefficients/lambdas": module.lambdas, "coefficients/omega": module.omega})
    for index, task in enumerate(tv.task_names):
        tensors.update({f"heads/{index}/{key}": t for key, t in section["heads"][task].items()})
    pt: PreferenceTensor | None = getattr(module, "preference_tensor", None)
    targets = []
    if pt is not None:
        for index, (name, g, a, b) in enumerate(zip(pt.names, pt.G, pt.A, pt.B, strict=True)):
            tensors.update({f"preference/{index}/G": g, f"preference/{index}/A": a, f"preference/{index}/B": b})
            targets.append({"name": name, "shape": list(pt.shapes[name])})
    config = {
        "format": FORMAT,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "preference_aware": module.preference_aware,
        "task_names": list(tv.task_names),
        "backbone_spec": section["backbone_spec"],
        "head_specs": [section["head_specs"][t] for t in tv.task_names],
        "backbone_class": section["backbone_class"],
        "head_classes": [section["head_classes"][t] for t in tv.task_names],
        "targets": targets,
        "rank": pt.rank if pt is not None else None,
        "preference_coefficients": "basis" in section,
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


class ParetoSet:
    """A loaded export: ``at(γ)`` gives the plain model for a preference (one model for AdaMerging exports)."""

    def __init__(self, task_vectors: TaskVectors, preference_tensor: PreferenceTensor | None,
                 config: dict[str, Any], coefficients: dict[str, Any] | None = None) -> None:
        self.task_vectors, self.preference_tensor, self.config = task_vectors, preference_tensor, config
        self.coefficients = coefficients  # {"lambdas", "omega", "basis"} for preference-conditioned coefficients

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.task_vectors.task_names

    @property
    def preference_aware(self) -> bool:
        return bool(self.config["preference_aware"])

    @torch.no_grad()
    def at(self, preference: Sequence[float] | Tensor | None = None) -> MergedModel:
        """A plain eval-mode model with weights base + Δ(γ) and the task heads; γ is validated and normalised."""
        gamma = preference_for(preference, self.task_names, self.preference_aware, "ParetoSet")
        deltas = None
        if self.preference_tensor is not None and gamma is not None:
            deltas = self.preference_tensor.delta(gamma.to(self.task_vectors.device))
        basis = offset = None
        if self.coefficients is not None and gamma is not None:  # as MergingModule.merged_parameters does
            c = self.coefficients
            bounds = self.config.get("lambda_bounds")
            gamma = gamma.to(c["lambdas"])
            offset = preference_coefficients(c["lambdas"], c["omega"], gamma, tuple(bounds) if bounds else None) \
                - c["lambdas"]
            basis = c["basis"]
        params = merge(self.task_vectors.theta0, basis, offset, deltas)
        shared = self.task_vectors.theta0
        return materialize(self.task_vectors, params, owned=[n for n, p in params.items() if p is not shared[n]])

    def to(self, device: torch.device | str) -> ParetoSet:
        """Move everything to ``device`` in place; returns self."""
        self.task_vectors.to(device)
        if self.preference_tensor is not None:
            self.preference_tensor.to(device)
        if self.coefficients is not None:
            c = self.coefficients
            self.coefficients = {"lambdas": c["lambdas"].to(device), "omega": c["omega"].to(device),
                                 "basis": {name: t.to(device) for name, t in c["basis"].items()}}
        return self

    def __repr__(self) -> str:
        kind = f"rank-{self.config['rank']} preference tensor" if self.preference_tensor is not None else "one model"
        return f"ParetoSet(tasks={list(self.task_names)}, {kind}, module={self.config['module']})"


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
            "base": {key[len("base/"):]: t for key, t in tensors.items() if key.startswith("base/")},
            "heads": {task: {key.split("/", 2)[2]: t for key, t in tensors.items() if key.startswith(f"heads/{index}/")}
                      for index, task in enumerate(names)},
        }
        tv = ckpt.unpack(section, backbone, heads, loader="load_pareto_set")
        preference_tensor = None
        if config["targets"]:
            shapes = {t["name"]: tuple(t["shape"]) for t in config["targets"]}
            preference_tensor = PreferenceTensor(shapes, len(names), int(config["rank"]))
            own = preference_tensor.state_dict()
            stored = {}
            for index in range(len(shapes)):
                for part in "GAB":
                    stored[f"{part}.{index}"] = tensors[f"preference/{index}/{part}"]
            if set(stored) != set(own):
                raise KeyError(f"preference tensor entries {sorted(set(own) ^ set(stored))}")
            preference_tensor.load_state_dict(stored, strict=True)
            preference_tensor.eval().requires_grad_(False)
        coefficients = None
        if config.get("preference_coefficients"):
            section["basis"] = {key[len("basis/"):]: t for key, t in tensors.items() if key.startswith("basis/")}
            coefficients = {"lambdas": tensors["coefficients/lambdas"], "omega": tensors["coefficients/omega"],
                            "basis": ckpt.unpack_basis(section, tv)}
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot rebuild the Pareto set stored in {str(path)!r}: {err}") from err
    return ParetoSet(tv, preference_tensor, config, coefficients)
