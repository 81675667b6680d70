"""Task vectors: θ0 (frozen), per-layer stacked τ ``[K, *shape]``, the frozen task heads, and task names.

A *layer* is one named floating-point parameter of the backbone (AdaMerging's layer-wise convention;
ViT-B/32's visual tower has 152). Non-float parameters and integer buffers are always taken from θ0; float buffers
(BatchNorm's running statistics) follow the task vectors' ``buffer_policy`` (`kernels.buffers`), for which their
differences ``b_k − b0`` are kept as ``buffer_tau``.

`TaskVectors` is deliberately not an ``nn.Module``: a LightningModule that holds one does not register
its tensors, so they never enter ``state_dict()``, a ``.ckpt``, or a DDP broadcast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from paretomerge.kernels import sparsify
from paretomerge.kernels.architecture import ModuleSpec
from paretomerge.kernels.buffers import DEFAULT_BUFFER_POLICY, check_policy, float_buffers
from paretomerge.kernels.builders import recognise


class _NotLookedFor:
    """A spec not looked for yet (a class, so that the marker survives ``copy.deepcopy`` and pickling)."""


_UNKNOWN: Any = _NotLookedFor()


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def check_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(task_names, str) or not isinstance(task_names, Sequence) or len(task_names) == 0:
        raise ValueError(f"task_names must be a non-empty sequence of strings, got {task_names!r}")
    names = tuple(task_names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique; repeated: {duplicates}")
    return names


class TaskVectors:
    """θ0 + stacked task vectors + heads. Build with `from_state_dicts` or `from_models`.

    ``tau=None`` holds only a merged base θ0 + Σλτ (what a `.ckpt` carries)."""

    def __init__(
        self,
        backbone: nn.Module,
        tau: Mapping[str, Tensor] | None,
        heads: Mapping[str, nn.Module],
        task_names: Sequence[str],
        backbone_spec: ModuleSpec | None = None,
        head_specs: Mapping[str, ModuleSpec | None] | None = None,
        buffer_tau: Mapping[str, Tensor] | None = None,
        buffer_policy: str = DEFAULT_BUFFER_POLICY,
        calibration: Tensor | None = None,
    ) -> None:
        self.backbone = _freeze(backbone)
        self.task_names = check_task_names(task_names)
        self.heads = nn.ModuleDict({name: _freeze(heads[name]) for name in self.task_names})
        # How a .ckpt rebuilds them; what is not given is recognised when first asked for (`backbone_spec`).
        self._backbone_spec = backbone_spec if backbone_spec is not None else _UNKNOWN
        self._head_specs = {t: (head_specs or {}).get(t) or _UNKNOWN for t in self.task_names}
        # The merged layers, in a fixed order: index l of λ[l, k] is layer_names[l].
        self.layer_names = tuple(n for n, p in self.backbone.named_parameters() if p.is_floating_point())
        self.tau = dict(tau) if tau is not None else None
        self.buffer_tau: dict[str, Tensor] = dict(buffer_tau or {})  # float buffer -> [K, *shape]: b_k − b0
        self.buffer_policy, self.calibration = DEFAULT_BUFFER_POLICY, None
        self.configure_buffers(buffer_policy, calibration)

    def configure_buffers(self, policy: str | None = None, calibration: Tensor | None = None) -> TaskVectors:
        """Set the float-buffer policy (``pretrained``, ``merged`` or ``recomputed``: `kernels.buffers`) that every
        merge of these task vectors follows, and the unlabeled inputs ``calibration [N, ...]`` (every task's, mixed)
        that ``recomputed`` estimates statistics on; None leaves either as it is. In place; returns self."""
        if policy is not None:
            self.buffer_policy = check_policy(policy)
        if calibration is not None:
            if not isinstance(calibration, Tensor) or calibration.ndim < 2 or len(calibration) == 0:
                raise ValueError("calibration must be a non-empty tensor of inputs [N, ...] (unlabeled images of every "
                                 f"task), got {type(calibration).__name__}")
            self.calibration = calibration.detach().to(self.device)
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether merges need calibration inputs that these task vectors do not have yet."""
        return self.buffer_policy == "recomputed" and bool(self.buffer_tau) and self.calibration is None

    @property
    def backbone_spec(self) -> ModuleSpec | None:
        """How a fresh process rebuilds the backbone: the spec given, or one `builders.recognise` finds (looked for
        once, when first needed: only a checkpoint needs it); None when the backbone is not a recognised builder's,
        and a checkpoint then needs ``backbone=`` to load."""
        if isinstance(self._backbone_spec, _NotLookedFor):
            self._backbone_spec = recognise(self.backbone)
        return self._backbone_spec

    @property
    def head_specs(self) -> dict[str, ModuleSpec | None]:
        """task -> how to rebuild its head (as `backbone_spec`), None where it cannot be recorded."""
        for task, spec in self._head_specs.items():
            if isinstance(spec, _NotLookedFor):
                self._head_specs[task] = recognise(self.heads[task])
        return dict(self._head_specs)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        pretrained: nn.Module,
        finetuned: Sequence[Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]]],
        task_names: Sequence[str],
        heads: Mapping[str, nn.Module],
        *,
        dtype: torch.dtype | None = None,
        backbone_spec: ModuleSpec | None = None,
        copy_backbone: bool = True,
        buffer_policy: str = DEFAULT_BUFFER_POLICY,
        calibration: Tensor | None = None,
    ) -> TaskVectors:
        """τ_k = θ_k − θ0 for every floating-point parameter, stacked to ``[K, *shape]``.

        ``finetuned`` holds one state dict per task, or a function returning it: functions are called one at a
        time and their result dropped once its row of every stack is written, so a large model needs memory for
        θ0, the K stacks and one fine-tuned state dict, never all K at once.
        ``pretrained`` and ``heads`` may be any ``nn.Module``s: a backbone returning features ``[B, D]`` (or a Hugging
        Face output with ``pooler_output``), heads taking them to logits. ``dtype`` stores τ in another dtype
        (``torch.bfloat16`` halves memory); merging computes in θ0's dtype. ``backbone_spec`` tells a fresh process how
        to rebuild the backbone; left out, a checkpoint records what `builders.recognise` finds (modules built by
        ``ModuleSpec.build``, torch.nn, open_clip by name, HF ``CLIPVisionModel``, timm), or else needs
        ``load_from_checkpoint(path, backbone=...)``. ``copy_backbone=False`` freezes and keeps ``pretrained``
        itself instead of a copy (one model's memory less; the caller must not train it afterwards).
        ``buffer_policy`` and ``calibration``: what a merged model's float buffers are (`configure_buffers`).
        """
        if not isinstance(pretrained, nn.Module):
            raise TypeError(f"pretrained must be an nn.Module, got {type(pretrained).__name__}")
        names = check_task_names(task_names)
        if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
            raise TypeError("finetuned must be a sequence of state dicts, one per task")
        if len(finetuned) != len(names):
            raise ValueError(f"got {len(finetuned)} fine-tuned state dicts for {len(names)} task names")
        if not isinstance(heads, Mapping) or set(heads) != set(names):
            got = sorted(heads) if isinstance(heads, Mapping) else type(heads).__name__
            raise ValueError(f"heads must map exactly the task names {list(names)} to modules, got {got}")
        for name in names:
            if not isinstance(heads[name], nn.Module):
                raise TypeError(f"head for task {name!r} is a {type(heads[name]).__name__}, not an nn.Module")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"task-vector dtype must be floating point, got {dtype}")

        for task, item in zip(names, finetuned, strict=True):
            if isinstance(item, nn.Module) or not (isinstance(item, Mapping) or callable(item)):
                raise TypeError(f"task {task!r}: fine-tuned weights must be a state dict or a function returning "
                                f"one (for a module, pass module.state_dict()), got {type(item).__name__}")
        backbone = copy.deepcopy(pretrained) if copy_backbone else pretrained
        reference = backbone.state_dict()
        params = {n: p for n, p in backbone.named_parameters() if p.is_floating_point()}
        tau = {n: torch.empty((len(names), *p.shape), dtype=dtype or p.dtype, device=p.device)
               for n, p in params.items()}
        buffers = float_buffers(backbone)
        buffer_tau = {n: torch.empty((len(names), *b.shape), dtype=b.dtype, device=b.device)
                      for n, b in buffers.items()}
        for k, (task, item) in enumerate(zip(names, finetuned, strict=True)):
            state = item() if callable(item) and not isinstance(item, Mapping) else item
            _check_state_dict(task, state, reference)
            with torch.no_grad():
                for layer, theta0 in params.items():
                    tau[layer][k] = state[layer].to(theta0.device, theta0.dtype) - theta0
                for name, b0 in buffers.items():
                    buffer_tau[name][k] = state[name].to(b0.device, b0.dtype) - b0
            del state  # a loaded state dict is freed before the next one is read
        heads_copy = {name: copy.deepcopy(heads[name]) for name in names}
        # the rest is recognised when first needed
        return cls(backbone, tau, heads_copy, names, backbone_spec, buffer_tau=buffer_tau, buffer_policy=buffer_policy,
                   calibration=calibration)

    @classmethod
    def from_models(
        cls,
        pretrained: nn.Module,
        finetuned_models: Sequence[nn.Module | Callable[[], nn.Module]],
        task_names: Sequence[str],
        heads: Mapping[str, nn.Module],
        **options: Any,
    ) -> TaskVectors:
        """`from_state_dicts` from fine-tuned modules, or functions returning one (called one at a time, each
        module's weights read and dropped before the next is made). ``options`` are `from_state_dicts`'s."""
        if isinstance(finetuned_models, Mapping) or not isinstance(finetuned_models, Sequence):
            raise TypeError("finetuned_models must be a sequence of modules (or functions returning one), one per task")

        def weights_of(index: int, item: Any) -> Callable[[], Mapping[str, Tensor]]:
            def read() -> Mapping[str, Tensor]:
                model = item() if callable(item) and not isinstance(item, nn.Module) else item
                if not isinstance(model, nn.Module):
                    raise TypeError(f"fine-tuned model {index} is a {type(model).__name__}, not an nn.Module "
                                    "(for state dicts, use TaskVectors.from_state_dicts)")
                return model.state_dict()
            return read

        for index, item in enumerate(finetuned_models):
            if not (isinstance(item, nn.Module) or callable(item)):
                raise TypeError(f"fine-tuned model {index} is a {type(item).__name__}, not an nn.Module or a "
                                "function returning one (for state dicts, use TaskVectors.from_state_dicts)")
        return cls.from_state_dicts(pretrained, [weights_of(i, m) for i, m in enumerate(finetuned_models)],
                                    task_names, heads, **options)

    # ---------------------------------------------------------------- preprocessing (SPEC §5)
    def with_tau(self, tau: Mapping[str, Tensor]) -> TaskVectors:
        """The same θ0, heads and tasks (shared, not copied) with other task vectors of the same shapes."""
        own = self._require_tau("with_tau")
        if set(tau) != set(own) or any(tuple(tau[n].shape) != tuple(own[n].shape) for n in own):
            raise ValueError("with_tau: the new task vectors must have the same layers and shapes")
        return self._sharing({n: tau[n] for n in own}, self.task_names)

    def subset(self, task_names: Sequence[str]) -> TaskVectors:
        """The same θ0 with only ``task_names`` (in that order): their task vectors and heads, shared, not copied."""
        names = check_task_names(task_names)
        unknown = [t for t in names if t not in self.task_names]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; these task vectors have {list(self.task_names)}")
        rows = [self.task_names.index(t) for t in names]
        tau = {n: t[rows] for n, t in self._require_tau("subset").items()}
        return self._sharing(tau, names)

    def _sharing(self, tau: Mapping[str, Tensor], names: Sequence[str]) -> TaskVectors:
        """These θ0 and heads (shared) with other task vectors, for ``names``; specs as known so far."""
        rows = [self.task_names.index(t) for t in names]
        buffer_tau = {n: t if rows == list(range(self.num_tasks)) else t[rows] for n, t in self.buffer_tau.items()}
        out = TaskVectors(self.backbone, tau, {t: self.heads[t] for t in names}, names, buffer_tau=buffer_tau,
                          buffer_policy=self.buffer_policy)
        out.calibration = self.calibration  # shared, not copied (a subset's merges still see every task's inputs)
        out._backbone_spec, out._head_specs = self._backbone_spec, {t: self._head_specs[t] for t in names}
        return out

    def ties(self, top_k: float = 0.2, disjoint_mean: bool = False) -> TaskVectors:
        """TIES-preprocessed task vectors: each τ_k trimmed to its top ``top_k`` entries by magnitude (ranked over
        the whole task vector) and masked to the elected sign (`sparsify.ties_select`). With ``disjoint_mean``
        each entry is also divided by the number of tasks that keep it, so that ``merge`` with every coefficient
        ``s`` gives the TIES merge ``θ0 + s·τ_ties``. Without it, these are the vectors of Pareto Merging++ and
        AdaMerging++."""
        selected = sparsify.ties_select(self._require_tau("TIES"), top_k)
        return self.with_tau(sparsify.disjoint_mean_split(selected) if disjoint_mean else selected)

    def dare(self, drop: float = 0.5, seed: int = 0) -> TaskVectors:
        """DARE: each entry dropped with probability ``drop``, the rest rescaled by 1/(1−drop); seeded."""
        return self.with_tau(sparsify.dare_drop(self._require_tau("DARE"), drop, seed))

    def _require_tau(self, what: str) -> dict[str, Tensor]:
        if self.tau is None:
            raise ValueError(f"{what} needs task vectors, but these hold only a checkpoint's merged base")
        return self.tau

    # ---------------------------------------------------------------- views
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def has_task_vectors(self) -> bool:
        return self.tau is not None

    @property
    def theta0(self) -> dict[str, Tensor]:
        """The merged layers of θ0 (the backbone's own frozen parameters, not copies)."""
        params = dict(self.backbone.named_parameters())
        return {name: params[name] for name in self.layer_names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.backbone.parameters())).device

    def apply_(self, fn: Callable[[Tensor], Tensor]) -> TaskVectors:
        """Apply a tensor conversion (what ``nn.Module._apply`` gets from ``.to``/``.cpu``/``.half``) in place."""
        self.backbone._apply(fn)
        self.heads._apply(fn)
        if self.tau is not None:
            self.tau = {name: fn(t) for name, t in self.tau.items()}
        self.buffer_tau = {name: fn(t) for name, t in self.buffer_tau.items()}
        if self.calibration is not None:
            self.calibration = fn(self.calibration)
        return self

    def to(self, device: torch.device | str) -> TaskVectors:
        """Move everything to ``device`` in place (dtypes unchanged); returns self."""
        # Always applied: `with_tau`/`ties` share the backbone and heads, so the backbone may already be on
        # ``device`` while this object's τ is not (``.to`` of a tensor already there is free).
        device = torch.device(device)
        return self.apply_(lambda t: t.to(device))

    def nbytes(self) -> int:
        """Bytes held by the stacked task vectors."""
        return sum(t.numel() * t.element_size() for t in (self.tau or {}).values())

    def __repr__(self) -> str:
        kind = "τ" if self.has_task_vectors else "base only"
        buffers = f", {len(self.buffer_tau)} float buffers {self.buffer_policy}" if self.buffer_tau else ""
        return (
            f"TaskVectors(tasks={list(self.task_names)}, layers={len(self.layer_names)}, {kind}{buffers}, "
            f"backbone={type(self.backbone).__name__})"
        )


def _check_state_dict(task: str, state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Refuse a fine-tuned state dict that does not match θ0, naming the first offending parameter."""
    if not isinstance(state, Mapping):
        raise TypeError(f"task {task!r}: fine-tuned weights must be a state dict, got {type(state).__name__}")
    for name, ref in reference.items():
        if name not in state:
            raise ValueError(
                f"task {task!r}: parameter {name!r} of the pretrained model is missing from the fine-tuned "
                "weights (different architecture?)"
            )
        value = state[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"task {task!r}: {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"task {task!r}: parameter {name!r} has shape {tuple(value.shape)} but the pretrained model "
                f"has {tuple(ref.shape)}"
            )
        if ref.is_floating_point():
            if not value.is_floating_point():
                raise ValueError(f"task {task!r}: parameter {name!r} is {value.dtype}, expected floating point")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"task {task!r}: parameter {name!r} contains NaN or inf")
    for name in state:
        if name not in reference:
            raise ValueError(
                f"task {task!r}: the fine-tuned weights have parameter {name!r}, which the pretrained "
                "model does not (different architecture?)"
            )
