"""The shared base of every learned merge: task vectors, λ, per-task evaluation, `at(...)`, `.ckpt` I/O.

Subclasses add trainable structure in `_build_trainable`, preference-dependent deltas in `deltas`, and
their objective in `training_step`. Merging and running always go through `paretomerge.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from paretomerge.kernels import (
    MergedModel,
    PreferenceBasis,
    TaskVectors,
    check_labels,
    compile_backend,
    forward_tasks,
    materialize,
    merge,
)
from paretomerge.kernels.sparsify import check_fraction
from paretomerge.modules import checkpoint as ckpt
from paretomerge.modules.checkpoint import CheckpointError
from paretomerge.preferences import equal_and_one_hots, preference_for


class MergingModule(L.LightningModule):
    """Owns a `TaskVectors` (never registered, so never in ``state_dict``) and the coefficients λ ``[L, K]``.

    ``ties_top_k`` (None, or e.g. 0.2) TIES-preprocesses the task vectors when they are attached (SPEC §5): on
    `ParetoMerging` that is Pareto Merging++, on `AdaMerging` it is AdaMerging++.
    """

    #: whether ``at(γ)`` depends on γ (False: one model, the preference may be left out)
    preference_aware = True

    def __init__(self, lr: float, lambda_init: float, lambda_bounds: Sequence[float] | None, seed: int,
                 ties_top_k: float | None = None, compile_forward: bool | str = False) -> None:
        super().__init__()
        self._compile_backend = compile_backend(compile_forward)
        if ties_top_k is not None:
            check_fraction("ties_top_k (the fraction of each task vector TIES keeps)", ties_top_k, allow_one=True)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be positive, got {lr!r}")
        if lambda_bounds is not None:
            if len(lambda_bounds) != 2 or not lambda_bounds[0] < lambda_bounds[1]:
                raise ValueError(f"lambda_bounds must be (low, high) with low < high, got {lambda_bounds!r}")
            if not lambda_bounds[0] <= lambda_init <= lambda_bounds[1]:
                raise ValueError(f"lambda_init={lambda_init} lies outside lambda_bounds={tuple(lambda_bounds)}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.task_vectors: TaskVectors | None = None
        self.lambdas: nn.Parameter | None = None
        self.accuracy = nn.ModuleDict()
        self._base_cache: tuple[int, Tensor, dict[str, Tensor]] | None = None  # (id of τ, λ, base)
        self._basis: PreferenceBasis | None = None  # τ̃ where the coefficients depend on γ: built from τ, or a .ckpt's
        self._said_unrecorded = False  # the warning that a .ckpt needs backbone=/heads= to load is given once

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

    def _build_metrics(self, tv: TaskVectors) -> None:
        # Top-1 accuracy as the mean of correct predictions (torchmetrics syncs it across processes): it needs no class
        # count, which a head only tells by its output (`_evaluate_step` checks the labels against that).
        for stage in ("val", "test"):
            self.accuracy[stage] = nn.ModuleList(
                nn.ModuleList(MeanMetric() for _ in tv.task_names)
                for _ in range(self.evaluation_preferences(tv.num_tasks).shape[0])
            ).to(self.device)

    def _tv(self) -> TaskVectors:
        if self.task_vectors is None:
            raise RuntimeError(
                f"{type(self).__name__} has no task vectors: pass task_vectors=... to the constructor, fit with "
                "a datamodule that has task_vectors(), or load a .ckpt"
            )
        return self.task_vectors

    def setup(self, stage: str) -> None:
        """Task vectors given to the constructor (or attached earlier) take precedence; the datamodule's
        ``task_vectors()`` is called only when the model has none, or only a checkpoint's base."""
        if self.task_vectors is not None and self.task_vectors.has_task_vectors:
            return
        provider = getattr(self.trainer.datamodule, "task_vectors", None) if self._trainer else None
        if provider is not None:
            self.attach(provider())
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

    def forward(self, batch: Mapping[str, Tensor], gamma: Tensor | None = None) -> dict[str, Tensor]:
        """Logits per task for ``batch`` (task -> images) under θ(λ, γ)."""
        tv = self._tv()
        return forward_tasks(tv.backbone, tv.heads, self.merged_parameters(gamma), batch, self._compile_backend)

    @torch.no_grad()
    def at(self, preference: Sequence[float] | Tensor | None = None) -> MergedModel:
        """A plain eval-mode model with weights θ(λ, γ) and the task heads; γ is validated and normalised.
        A module whose model does not depend on γ (``preference_aware = False``) accepts ``None``."""
        tv = self._tv()
        gamma = preference_for(preference, tv.task_names, self.preference_aware, type(self).__name__)
        params = self.merged_parameters(None if gamma is None else gamma.to(self.device))
        shared = self.base_parameters()
        # Layers with a Δ are new tensors the model can own; the others are the cached base (or a .ckpt's θ0) itself.
        return materialize(tv, params, owned=[n for n, p in params.items() if p is not shared[n]])

    # ------------------------------------------------------------------ optimisation
    def training_preference(self) -> Tensor:
        """γ ``[K]`` for the current step."""
        raise NotImplementedError

    def objective(self, logits: Mapping[str, Tensor], gamma: Tensor) -> dict[str, Tensor]:
        """The loss (key ``loss``), per-task mean entropies (``entropies [K]``) and other scalars to log."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        tv = self._tv()
        self._base_cache = None  # λ is about to change; do not hold a stale base beside the merged weights
        images = {t: x for t, (x, _) in self.split_batch(batch, tv.task_names, "train").items()}
        gamma = self.training_preference().to(self.device)
        parts = self.objective(self(images, gamma), gamma)
        loss, f = parts["loss"], parts["entropies"]
        finite = bool(torch.isfinite(loss))
        # Every process must stop together, or the others wait in the gradient all-reduce until a timeout.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            where = f"at step {self.global_step}, preference {[round(x, 4) for x in gamma.tolist()]}"
            if finite:
                raise FloatingPointError(f"non-finite loss in another process {where} of this one; see its error")
            bad = [t for t, v in zip(tv.task_names, f.tolist(), strict=True) if not math.isfinite(v)]
            culprit = f"task entropy not finite for {bad}" if bad else "entropies are finite; a regulariser is not"
            raise FloatingPointError(f"non-finite loss {loss.item()} {where}: {culprit}")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k not in ("loss", "entropies")})
        self.log("train/mean_entropy", f.mean())
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

    @staticmethod
    def split_batch(batch: Any, task_names: Sequence[str], stage: str) -> dict[str, tuple[Tensor, Tensor | None]]:
        """task -> (images, labels or None) from a batch dict whose values are images or (images, labels, ...).

        Training (``stage="train"``) needs every task; evaluation takes the tasks present (a ``None`` value is an
        exhausted loader of ``CombinedLoader(..., mode="max_size")``) and needs labels.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{stage} batches must be dicts task -> images (train) or (images, labels) (val/test), got "
                f"{type(batch).__name__}; return CombinedLoader({{task: loader}}) from the dataloader hook"
            )
        unknown = [t for t in batch if t not in task_names]
        if unknown:
            raise KeyError(f"the {stage} batch has tasks {unknown} that the model does not know ({list(task_names)})")
        missing = [t for t in task_names if batch.get(t) is None]
        if stage == "train" and missing:
            raise KeyError(f"the training batch has no images for tasks {missing} (it has {list(batch)})")
        out = {}
        for task in task_names:
            value = batch.get(task)
            if value is None:
                continue
            images, labels = (value[0], value[1] if len(value) > 1 else None) if isinstance(value, (list, tuple)) \
                else (value, None)
            if stage != "train" and labels is None:
                raise ValueError(f"the {stage} batch of task {task!r} has no labels; give (images, labels)")
            out[task] = (images, labels)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluation_preferences(self, num_tasks: int) -> Tensor:
        """``[P, K]``: the equal preference and each one-hot."""
        return equal_and_one_hots(num_tasks)

    def preference_label(self, index: int) -> str:
        return "equal" if index == 0 else f"onehot_{self.task_vectors.task_names[index - 1]}"

    def _evaluate_step(self, batch: Mapping[str, Any], stage: str) -> None:
        tv = self._tv()
        labeled = self.split_batch(batch, tv.task_names, stage)
        if not labeled:
            return
        images = {t: x for t, (x, _) in labeled.items()}
        preferences = self.evaluation_preferences(tv.num_tasks).to(self.device)
        for p, gamma in enumerate(preferences):
            logits = self(images, gamma)
            for k, task in enumerate(tv.task_names):
                if task in labeled:
                    labels = labeled[task][1]
                    if p == 0:
                        check_labels(logits[task], labels, task)
                    self.accuracy[stage][p][k].update((logits[task].argmax(-1) == labels).float())

    def _evaluate_epoch_end(self, stage: str) -> None:
        tv = self._tv()
        for p, row in enumerate(self.accuracy[stage]):
            label = self.preference_label(p)
            values = [metric.compute() for metric in row]  # torchmetrics gathers every process's counts here
            # Already equal on every process; sync_dist averages equal values (a no-op) and keeps Lightning from
            # warning that epoch-level values are unsynced under DDP.
            for task, value in zip(tv.task_names, values, strict=True):
                self.log(f"{stage}/acc/{label}/{task}", value, sync_dist=True)
            self.log(f"{stage}/acc/{label}/mean", torch.stack(values).mean(), prog_bar=(p == 0), sync_dist=True)
            for metric in row:
                metric.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluate_epoch_end("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluate_epoch_end("test")

    # ------------------------------------------------------------------ checkpoints
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tv = self._tv()
        missing = ckpt.unrecorded(tv)
        if missing and not self._said_unrecorded:
            self._said_unrecorded = True
            loader = f"{type(self).__name__}.load_from_checkpoint"
            rank_zero_warn(f"{type(self).__name__}: this checkpoint {ckpt.missing_modules_message(missing, loader)}")
        checkpoint[ckpt.SECTION] = ckpt.pack(tv, self.base_parameters(), self.preference_basis())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = ckpt.section_of(checkpoint)
        if self.task_vectors is None:
            state = checkpoint.get("state_dict") or {}
            self.restore(section, loader=f"{type(self).__name__}.load_from_checkpoint",
                         state_dtype=state["lambdas"].dtype if "lambdas" in state else None)
            return
        # resuming: the task vectors must be those the checkpoint was trained with, and the basis is the stored one
        ckpt.check_compatible(ckpt.section_signature(section), self.task_vectors, "the checkpoint")
        lambdas = checkpoint.get("state_dict", {}).get("lambdas")
        if self.task_vectors.has_task_vectors and lambdas is not None:
            ckpt.check_same_weights(section, self.task_vectors, lambdas)
        self._restore_basis(section)

    def restore(self, section: Mapping[str, Any], loader: str, backbone: nn.Module | None = None,
                heads: Mapping[str, nn.Module] | None = None, state_dtype: torch.dtype | None = None) -> None:
        """Rebuild from a `.ckpt`'s section (or an export's, `load_pareto_set`) in a process that has nothing else:
        the base-only task vectors (``backbone``/``heads`` for what it could not record; in the dtype the base was
        saved in) and the preference basis. λ, ω, G, A, B are made ``state_dtype`` (the dtype they were saved in) and
        loaded after this, from the state dict."""
        self.attach(ckpt.unpack(section, backbone, heads, loader=loader))
        if state_dtype is not None:
            for param in self.parameters():
                param.data = param.data.to(state_dtype)
        self._restore_basis(section)

    def _restore_basis(self, section: Mapping[str, Any]) -> None:
        # The stored basis, bit for bit: at(γ) after loading, and a resumed fit, use the formula the model trained with.
        tv = self.task_vectors
        self._basis = ckpt.unpack_basis(section, tv, self.hparams.get("basis_rank"))
        if self.preference_conditioned and self._basis is None:
            raise CheckpointError(f"{type(self).__name__} has preference-conditioned coefficients, but the checkpoint "
                                  "holds no preference basis for them (written by the paper's configuration, or "
                                  "damaged)")
        if self._basis is not None and self.hparams.get("basis_rank") is None and tv.has_task_vectors:
            # The full basis is τ: resuming keeps the task vectors (shared) once they are checked to be the stored ones.
            for name, stored in self._basis.dense.items():
                if not torch.equal(stored, tv.tau[name].to(stored.dtype)):
                    raise CheckpointError(f"the task vectors differ from the ones this checkpoint was trained with "
                                          f"(its full preference basis), first at layer {name!r}")
            self._basis = None

    @classmethod
    def upgrade_hyperparameters(cls, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Stored hyperparameters with what a checkpoint written before a hyperparameter existed meant by it."""
        return dict(stored)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool = True,
        backbone: nn.Module | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        **kwargs: Any,
    ):
        """Lightning's loader, after checking the file; unpickles nothing but weights unless told to.

        ``backbone`` and ``heads`` (task -> module) rebuild what the checkpoint could not record (a backbone or heads
        that are not a recognised builder's: it says so at save, and loading without them names them): modules of
        the same class and parameter shapes, whose weights are replaced by the checkpoint's (copies are loaded; the
        modules given are left as they are). Other ``kwargs`` override hyperparameters, as in Lightning.
        """
        with ckpt.supplied_modules(backbone, heads):  # checks their types first
            if not hasattr(checkpoint_path, "read"):
                ckpt.inspect_checkpoint(checkpoint_path, weights_only=weights_only)
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                weights_only=weights_only, **kwargs,
            )
