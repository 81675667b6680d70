"""The shared base of every learned merge: task vectors, λ, θ(γ) and its cached base, the forward, `at(...)`, the
training step and the optimizer. Per-task evaluation is `evaluation.PerTaskEvaluation`, `.ckpt` I/O
`checkpoint_hooks.CheckpointHooks`.

Subclasses add trainable structure in `_build_trainable`, preference-dependent deltas in `deltas`, and
their objective in `objective`. Merging and running always go through `paretomerge.kernels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from paretomerge.kernels import (
    MergedModel,
    PreferenceBasis,
    TaskVectors,
    compile_backend,
    forward_tasks,
    materialize,
    merge,
)
from paretomerge.kernels.buffers import CALIBRATION_IMAGES, buffers_for, calibration_set
from paretomerge.kernels.inputs import Inputs, is_tokens
from paretomerge.kernels.sparsify import check_fraction
from paretomerge.modules import checkpoint as ckpt
from paretomerge.modules.checkpoint_hooks import CheckpointHooks
from paretomerge.modules.evaluation import PerTaskEvaluation
from paretomerge.modules.steps import check_finite_loss, split_batch
from paretomerge.objectives import check_objective, resolve_objective, task_objectives
from paretomerge.preferences import preference_for


class MergingModule(PerTaskEvaluation, CheckpointHooks, L.LightningModule):
    """Owns a `TaskVectors` (never registered, so never in ``state_dict``) and the coefficients λ ``[L, K]``.

    ``ties_top_k`` (None, or e.g. 0.2) TIES-preprocesses the task vectors when they are attached (SPEC §5): on
    `ParetoMerging` that is Pareto Merging++, on `AdaMerging` it is AdaMerging++. ``objective`` is each task's f_k:
    ``"entropy"``, ``"loss"`` (a language model's next-token loss), or None for the batch's default (loss for token
    batches, entropy for images: `objectives.resolve_objective`).
    """

    #: whether ``at(γ)`` depends on γ (False: one model, the preference may be left out)
    preference_aware = True
    #: task -> (images, labels or None) out of a training or evaluation batch; a subclass may read another format
    split_batch = staticmethod(split_batch)

    def __init__(self, lr: float, lambda_init: float, lambda_bounds: Sequence[float] | None,
                 ties_top_k: float | None = None, compile_forward: bool | str = False,
                 objective: str | None = None) -> None:
        super().__init__()
        self._compile_backend = compile_backend(compile_forward)
        check_objective(objective)
        if ties_top_k is not None:
            check_fraction("ties_top_k (the fraction of each task vector TIES keeps)", ties_top_k, allow_one=True)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be positive, got {lr!r}")
        if lambda_bounds is not None:
            if len(lambda_bounds) != 2 or not lambda_bounds[0] < lambda_bounds[1]:
                raise ValueError(f"lambda_bounds must be (low, high) with low < high, got {lambda_bounds!r}")
            if not lambda_bounds[0] <= lambda_init <= lambda_bounds[1]:
                raise ValueError(f"lambda_init={lambda_init} lies outside lambda_bounds={tuple(lambda_bounds)}")
        self.task_vectors: TaskVectors | None = None
        self.lambdas: nn.Parameter | None = None
        self.accuracy = nn.ModuleDict()  # per-task metrics, built with λ (`PerTaskEvaluation._build_metrics`)
        self._base_cache: tuple[int, Tensor, dict[str, Tensor]] | None = None  # (id of τ, λ, base)
        self._basis: PreferenceBasis | None = None  # τ̃ where the coefficients depend on γ: built from τ, or a .ckpt's
        self._said_unrecorded = False  # the warning that a .ckpt needs backbone=/heads= to load is given once
        self._said_unused_div = False  # the warning that β_div does not act on token batches is given once

    # ------------------------------------------------------------------ task vectors and trainables
    def attach(self, task_vectors: TaskVectors) -> None:
        """Use ``task_vectors`` (moved to this module's device); builds λ and subclass parameters the first time.

        Task vectors replacing earlier ones must have the same tasks, backbone shapes and head shapes.
        """
        if not isinstance(task_vectors, TaskVectors):
            raise TypeError(f"task_vectors must be a TaskVectors, got {type(task_vectors).__name__}")
        if self.task_vectors is not None:
            ckpt.check_compatible(ckpt.signature(self.task_vectors), task_vectors, "the model's current task vectors")
        top_k = self.hparams.get("ties_top_k")
        if top_k is not None and task_vectors.has_task_vectors:
            task_vectors = task_vectors.ties(top_k)  # Pareto Merging++ / AdaMerging++ (a .ckpt base is already merged)
        if self.lambdas is None:
            self._build_trainable(task_vectors)
            self._build_metrics(task_vectors)
        self._base_cache = None
        self._basis = None  # built from these task vectors when first needed
        self.task_vectors = task_vectors.to(self.device)

    def _apply(self, fn: Any, recurse: bool = True) -> MergingModule:
        # .to()/.cpu()/.half() reach the unregistered task vectors too, so they follow the module.
        self._base_cache = None  # would stay on the old device or dtype
        super()._apply(fn, recurse)
        if getattr(self, "task_vectors", None) is not None:
            self.task_vectors.apply_(fn)
        if getattr(self, "_basis", None) is not None:
            self._basis.apply_(fn)
        return self

    def _build_trainable(self, tv: TaskVectors) -> None:
        shape = (len(tv.layer_names), tv.num_tasks)
        self.lambdas = nn.Parameter(torch.full(shape, float(self.hparams.lambda_init), device=self.device))

    def _tv(self) -> TaskVectors:
        if self.task_vectors is None:
            raise RuntimeError(
                f"{type(self).__name__} has no task vectors: pass task_vectors=... to the constructor, fit with "
                "a datamodule that has task_vectors(), or load a .ckpt"
            )
        return self.task_vectors

    def _calibrate(self) -> None:
        """Under ``buffer_policy='recomputed'``, task vectors without calibration inputs take them from the fit's
        training data (`kernels.buffers.calibration_set` of its first batches)."""
        tv = self._tv()
        loader = getattr(self.trainer.datamodule, "train_dataloader", None) if self._trainer else None
        if not tv.needs_calibration or loader is None:
            return
        per_task: dict[str, list[Tensor]] = {t: [] for t in tv.task_names}
        share = max(1, CALIBRATION_IMAGES // tv.num_tasks)
        for batch in loader():
            if isinstance(batch, tuple) and batch and isinstance(batch[0], Mapping):  # a CombinedLoader's (batch, i, j)
                batch = batch[0]
            for task, (inputs, _) in self.split_batch(batch, tv.task_names, "train").items():
                per_task[task].append(inputs)
            if all(sum(len(x) for x in parts) >= share for parts in per_task.values()):
                break
        tv.configure_buffers(calibration=calibration_set({t: torch.cat(x) for t, x in per_task.items()}))

    def setup(self, stage: str) -> None:
        """Task vectors given to the constructor (or attached earlier) take precedence; the datamodule's
        ``task_vectors()`` is called only when the model has none, or only a checkpoint's base."""
        if self.task_vectors is not None and self.task_vectors.has_task_vectors:
            self._calibrate()
            return
        provider = getattr(self.trainer.datamodule, "task_vectors", None) if self._trainer else None
        if provider is not None:
            self.attach(provider())
            self._calibrate()
        elif self.task_vectors is None:
            self._tv()  # raises the explanation
        elif stage == "fit":
            raise RuntimeError(
                "this model was loaded from a .ckpt, which holds no task vectors; to train it, fit with a "
                "datamodule whose task_vectors() gives the same tasks"
            )

    # ------------------------------------------------------------------ the merged model
    def deltas(self, gamma: Tensor | None) -> dict[str, Tensor] | None:
        """Preference-dependent additions to the merged weights; none in the base."""
        return None

    def coefficients(self, gamma: Tensor | None) -> Tensor:
        """The task-vector coefficients c(γ) ``[L, K]`` (``[M, L, K]`` for ``[M, K]`` preferences) that `merge`
        takes: λ in the base; `ParetoMerging`'s preference-conditioned map where it is enabled."""
        return self.lambdas

    @property
    def preference_conditioned(self) -> bool:
        """Whether `coefficients` depends on γ (then ``at(γ)`` needs the preference basis τ̃)."""
        return False

    def preference_basis(self) -> PreferenceBasis | None:
        """τ̃, what c(γ) − λ multiplies (SPEC §3b): τ itself for ``basis_rank=None`` (shared, never a second copy), else
        a truncated SVD of τ built when first needed, or a `.ckpt`'s; None when the coefficients do not depend on γ."""
        if not self.preference_conditioned:
            return None
        tv = self._tv()
        if self._basis is None:
            if not tv.has_task_vectors:
                raise RuntimeError(f"{type(self).__name__} has preference-conditioned coefficients but neither task "
                                   "vectors nor a checkpoint's preference basis to apply them to")
            rank = self.hparams.get("basis_rank")
            if rank is None:
                return PreferenceBasis.full(tv.tau)
            self._basis = PreferenceBasis.truncated(tv.tau, rank)
        if self._basis.device != tv.device:  # the task vectors were moved on their own (`task_vectors.to(...)`)
            self._basis.apply_(lambda t: t.to(tv.device))
        return self._basis

    def on_fit_start(self) -> None:
        # Every process trains with rank zero's basis: an SVD is not promised to give the same bits on every device.
        # Only a truncated basis travels (megabytes); the full one is τ, which every process has.
        if self.preference_conditioned and self.trainer.world_size > 1 and self.hparams.get("basis_rank") is not None:
            state = self.trainer.strategy.broadcast(self.preference_basis().state(), src=0)
            self._basis = ckpt.unpack_basis({"preference_basis": state}, self._tv(), self.hparams.basis_rank)

    def merged_parameters(self, gamma: Tensor | None) -> dict[str, Tensor]:
        """θ(γ) = θ0 + Σ_k λ_k τ_k + Σ_k (c_k(γ) − λ_k) τ̃_k + Δ(γ) for every merged layer: one formula, through the
        one merge kernel, with gradients on or off, in the module and in an exported `ParetoSet` (which runs this).

        The base θ0 + Σλτ is merged with gradients while λ trains; otherwise it is merged once per value of λ
        (`base_parameters`), or it is a `.ckpt`'s stored base. Layers nothing is added to are then the cached tensors
        themselves: read them, do not modify them in place.
        """
        tv = self._tv()
        # Under mixed precision (autocast) too: the weights are built in their own dtype, as at(γ) builds them.
        with torch.autocast(self.device.type, enabled=False):
            if torch.is_grad_enabled() and tv.has_task_vectors and self.lambdas.requires_grad:
                base = merge(tv.theta0, tv.tau, self.lambdas)
            else:
                base = self.base_parameters()
            basis = self.preference_basis()
            offsets = None if basis is None else self.coefficients(gamma) - self.lambdas
            return merge(base, basis, offsets, self.deltas(gamma))

    @torch.no_grad()
    def base_parameters(self) -> dict[str, Tensor]:
        """The preference-independent base θ0 + Σλτ of every merged layer (what a `.ckpt` and an export store).

        Cached until λ's values change, new task vectors are attached or the module moves (the cache is dropped at
        each training step, so training never holds it beside the merged weights). The dict is yours; the tensors
        are shared with the cache: treat them as read-only.
        """
        tv = self._tv()
        if not tv.has_task_vectors:
            return tv.theta0
        # `attach` and `_apply` drop the cache; the τ dict's identity catches a direct `task_vectors.to(...)`, and λ is
        # compared by value because a fused optimizer updates it without bumping its version counter.
        cached = self._base_cache
        if cached is None or cached[0] != id(tv.tau) or not torch.equal(cached[1], self.lambdas):
            self._base_cache = None  # free the old base before merging the new one
            base = merge(tv.theta0, tv.tau, self.lambdas)
            self._base_cache = (id(tv.tau), self.lambdas.detach().clone(), base)
        return dict(self._base_cache[2])

    def forward(self, batch: Mapping[str, Inputs], gamma: Tensor | None = None) -> dict[str, Tensor]:
        """Logits per task for ``batch`` (task -> images or a token batch) under θ(λ, γ)."""
        tv = self._tv()
        params = self.merged_parameters(gamma)
        # the policy's float buffers (under `recomputed`: this batch's own statistics; none without float buffers)
        params |= buffers_for(tv, self.coefficients(gamma))
        return forward_tasks(tv.backbone, tv.heads, params, batch, self._compile_backend)

    @torch.no_grad()
    def at(self, preference: Sequence[float] | Tensor | None = None) -> MergedModel:
        """A plain eval-mode model with weights θ(λ, γ) and the task heads; γ is validated and normalised.
        A module whose model does not depend on γ (``preference_aware = False``) accepts ``None``."""
        tv = self._tv()
        gamma = preference_for(preference, tv.task_names, self.preference_aware, type(self).__name__)
        gamma = None if gamma is None else gamma.to(self.device)
        params = self.merged_parameters(gamma)
        shared = self.base_parameters()
        # Layers with a Δ are new tensors the model can own; the others are the cached base (or a .ckpt's θ0) itself.
        owned = [n for n, p in params.items() if p is not shared[n]]
        buffers = buffers_for(tv, self.coefficients(gamma), params)  # the policy's float buffers: new tensors
        return materialize(tv, params | buffers, owned=owned + list(buffers))

    # ------------------------------------------------------------------ optimisation
    def training_preference(self) -> Tensor:
        """γ ``[K]`` for the current step."""
        raise NotImplementedError

    def objective(self, logits: Mapping[str, Tensor], gamma: Tensor,
                  inputs: Mapping[str, Inputs] | None = None) -> dict[str, Tensor]:
        """The loss (key ``loss``), per-task objectives (``f [K]``) and other scalars to log; ``inputs`` (task -> the
        batch the logits came from) hold a language model's targets."""
        raise NotImplementedError

    def objective_name(self, inputs: Mapping[str, Inputs] | None) -> str:
        """Each task's f_k for these batches: the ``objective`` asked for, else the batches' default
        (`objectives.resolve_objective`)."""
        first = next(iter(inputs.values())) if inputs else None
        return resolve_objective(self.hparams.get("objective"), first)

    def task_objectives(self, logits: Mapping[str, Tensor], inputs: Mapping[str, Inputs] | None) -> dict[str, Tensor]:
        """``f [K]`` (and the diversity term where it applies) of the module's objective (`objectives.task_objectives`,
        shared by every method)."""
        beta_div = self.hparams.get("beta_div", 0.0)
        if beta_div > 0 and inputs and any(is_tokens(x) for x in inputs.values()) and not self._said_unused_div:
            self._said_unused_div = True
            rank_zero_warn(f"{type(self).__name__}: beta_div={beta_div} is not applied to token batches: the diversity "
                           "term keeps a classifier's entropy minimisation from collapsing a task onto one class, and "
                           "a language model's next-token objective has no classes to collapse onto; set beta_div=0")
        return task_objectives(logits, self._tv().task_names, self.objective_name(inputs), beta_div, inputs)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        tv = self._tv()
        self._base_cache = None  # λ is about to change; do not hold a stale base beside the merged weights
        inputs = {t: x for t, (x, _) in self.split_batch(batch, tv.task_names, "train").items()}
        gamma = self.training_preference().to(self.device)
        parts = self.objective(self(inputs, gamma), gamma, inputs)
        loss, f = parts["loss"], parts["f"]
        check_finite_loss(self.trainer.strategy, loss, f, tv.task_names, self.global_step, gamma)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k not in ("loss", "f")})
        self.log(f"train/mean_{self.objective_name(inputs)}", f.mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.clamp_lambdas()

    @torch.no_grad()
    def clamp_lambdas(self) -> None:
        """Project λ into ``lambda_bounds`` (AdaMerging's rule), after every optimizer step."""
        if self.hparams.lambda_bounds is not None:
            self.lambdas.clamp_(*self.hparams.lambda_bounds)
