"""`ParetoFrontLogger`: the learned front in TensorBoard while it trains.

Every N validations it evaluates the SPEC §4 preference set (plus the equal preference and the one-hots) on the
datamodule's labeled split, through ``module.at(γ)`` — the module's merge and forward — on the same inputs for
every preference, and logs through the Lightning logger. Scores are the datamodule's (`paretomerge.pareto.score_of`):
accuracy, or a language model's next-token loss, whose hypervolume is that of the gains over θ0's per-task loss on
the same split (`paretomerge.front.reference_point`; logged as ``front/reference/<task>``):

- scalars ``front/hypervolume``, ``front/hypervolume_normalised`` (each task's gain divided by the individual
  fine-tuned model's on the same split), ``front/spread`` (`paretomerge.pareto.front_spread`),
  ``front/non_dominated``, and ``front/acc/<equal|onehot_task>/<task>`` (``front/loss/...`` for a loss);
- figures ``front/figure`` (K=2 scatter labelled by preference, K=3 3-D scatter, K≥4 pairwise projections with each
  task's accuracy range on the diagonal) and ``front/parallel_coordinates`` (K≥4), with Task Arithmetic, AdaMerging
  (``adamerging_ckpt``) and MAP's predicted and real fronts (when a `MAPBaseline` callback has run) on the same axes,
  and the zero-shot (θ0) and individual (fine-tuned) accuracies on the same split as references;
- text ``front/table``: every evaluated point, preference → per-task accuracy;
- at the end of fit, ``front/final_figure`` (with MAP's end-of-fit front) and the hyperparameters with the final
  front metrics (``final/...``) for TensorBoard's HParams tab.

Figures and text need a `TensorBoardLogger`; other loggers get the scalars and hyperparameters. Evaluation runs on
global rank zero (the other ranks go on to the next step and wait in its first collective).

A SIGTERM (SLURM's preemption signal) while it evaluates stops the evaluation before the next model, so that Lightning
stops at the end of the step and writes its checkpoint at once instead of after the whole front (which on CLIP takes
minutes, more than SLURM's grace period). The interrupted evaluation is in the checkpoint (``pending``), and a fit
resumed from it evaluates that front first and logs it at its step; after a SIGTERM the end-of-fit evaluation is left
to the resumed fit too.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from paretomerge.front import (
    evaluate_front,
    individual_scores,
    module_preferences,
    reference_point,
    static_point,
    zero_shot_scores,
)
from paretomerge.pareto import (
    HypervolumeValue,
    front_spread,
    individual_gains,
    measure_hypervolume,
    non_dominated,
    score_of,
)
from paretomerge.plotting import Overlay, front_figures, front_table


class _Stopped(Exception):
    """The trainer received SIGTERM while the logger evaluated."""


class _StopOnSigterm:
    """A datamodule whose ``evaluate`` raises `_Stopped` once the trainer has received SIGTERM: checked before each
    model, so a stop waits for one evaluation at most. Everything else is the datamodule's."""

    def __init__(self, trainer: L.Trainer) -> None:
        self._trainer, self._datamodule = trainer, trainer.datamodule

    def __getattr__(self, name: str) -> Any:
        return getattr(self._datamodule, name)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._trainer, "received_sigterm", False):
            raise _Stopped
        return self._datamodule.evaluate(*args, **kwargs)


class ParetoFrontLogger(L.Callback):
    """every_n_validations: evaluate after every N-th validation (sanity checks excluded).
    split: the labeled split to evaluate (``val``; the test split is the adaptation data).
    adamerging_ckpt: an AdaMerging ``.ckpt`` whose one model is drawn beside the front.
    baselines: draw Task Arithmetic (and AdaMerging) on the figures.
    seed: seeds the Dirichlet part of the preference set (K ≥ 4)."""

    def __init__(self, every_n_validations: int = 1, split: str = "val", adamerging_ckpt: str | None = None,
                 baselines: bool = True, seed: int = 0, progress: bool = True) -> None:
        if isinstance(every_n_validations, bool) or not isinstance(every_n_validations, int) \
                or every_n_validations < 1:
            raise ValueError(f"every_n_validations must be a positive int, got {every_n_validations!r}")
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if adamerging_ckpt is not None:  # refused now, not at the first validation many steps later
            from paretomerge.modules.checkpoint import inspect_checkpoint

            inspect_checkpoint(adamerging_ckpt)
        self.every_n_validations, self.split, self.adamerging_ckpt = every_n_validations, split, adamerging_ckpt
        self.baselines, self.seed, self.progress = baselines, seed, progress
        self.validations = 0
        self.preferences: torch.Tensor | None = None  # [P, K] evaluated preferences
        self.front: torch.Tensor | None = None  # Acc [P, K] of the last evaluation
        self.metrics: dict[str, float] = {}  # scalars of the last evaluation
        self.evaluated_at: int | None = None  # global step of the last evaluation
        self.pending: int | None = None  # global step of an evaluation a SIGTERM interrupted (in the checkpoint)
        self._individual: np.ndarray | None = None
        self._zero_shot: np.ndarray | None = None
        self._reference: np.ndarray | None = None  # the hypervolume's reference point, for a loss
        self._warned_zero = False
        self._overlays: list[Overlay] | None = None
        self.seconds = {"evaluating": 0.0, "figures": 0.0}  # this fit's time in the logger, said at its end
        self.evaluations = 0

    # ------------------------------------------------------------------ hooks
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self._log_front(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pending is not None and self.pending == trainer.global_step:  # resumed from a stop that interrupted it
            self._log_front(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_final(trainer, pl_module)
        if self.evaluations:
            rank_zero_info(f"ParetoFrontLogger: {self.evaluations} front evaluation(s) of {len(self.preferences)} "
                           f"preferences on the {self.split} split took {self.seconds['evaluating']:.1f} s, the "
                           f"figures {self.seconds['figures']:.1f} s")

    def state_dict(self) -> dict[str, Any]:
        # the every-N rhythm, and the evaluation a stop interrupted, for a resumed run
        return {"validations": self.validations, "pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
        pending = state_dict.get("pending")
        self.pending = None if pending is None else int(pending)

    # ------------------------------------------------------------------ evaluation
    def _usable(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if not hasattr(trainer.datamodule, "evaluate") or getattr(pl_module, "task_vectors", None) is None:
            rank_zero_warn("ParetoFrontLogger needs a module with task vectors and a datamodule with "
                           "evaluate(net, split); nothing logged")
            return False
        return True

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Evaluate and measure the front; False when a SIGTERM stopped it (then ``pending`` keeps the step)."""
        self.pending = trainer.global_step  # until it is done: a checkpoint written meanwhile records it
        start = time.perf_counter()
        try:
            self._evaluate_front(trainer, pl_module, _StopOnSigterm(trainer))
        except _Stopped:
            rank_zero_info(f"ParetoFrontLogger: SIGTERM while evaluating the front at step {trainer.global_step}: "
                           "stopped, so that the checkpoint is written now; a fit resumed from it evaluates this front")
            return False
        finally:
            self.seconds["evaluating"] += time.perf_counter() - start
        self.pending = None
        return True

    def _evaluate_front(self, trainer: L.Trainer, pl_module: L.LightningModule, data: Any) -> None:
        tasks = list(pl_module.task_vectors.task_names)
        preferences = module_preferences(pl_module, self.seed)  # one point, the equal one, for AdaMerging
        show = self.progress and trainer.progress_bar_callback is not None
        front = evaluate_front(pl_module, data, preferences, show, split=self.split)
        acc, score = front.numpy(), score_of(data)
        reference = self._reference_point(data, pl_module)
        metrics = {"front/spread": front_spread(acc, score),
                   "front/non_dominated": float(len(non_dominated(acc, score)))}
        if score.higher_is_better or reference is not None:
            self._log_volume(metrics, "front/hypervolume", measure_hypervolume(acc, score=score, reference=reference))
        if reference is not None:
            metrics.update({f"front/reference/{t}": float(v) for t, v in zip(tasks, reference, strict=True)})
        individual = self._individual_scores(data, pl_module)
        scale = None if individual is None or "front/hypervolume" not in metrics else \
            individual_gains(individual, score, reference)
        if scale is not None and (scale > 0).all():
            self._log_volume(metrics, "front/hypervolume_normalised", measure_hypervolume(acc, scale, score, reference))
        elif scale is not None and not self._warned_zero:
            self._warned_zero = True  # a fine-tuned model no better than the reference (random weights...): no scale
            rank_zero_warn(f"ParetoFrontLogger: a fine-tuned model is no better than the reference on its own task "
                           f"({individual.tolist()}); front/hypervolume_normalised is not logged")
        short = "acc" if score.name == "accuracy" else score.name
        for p, preference in enumerate(preferences):
            one_hot = torch.isclose(preference.max(), torch.tensor(1.0))
            if p == 0 or one_hot:
                label = "equal" if p == 0 else f"onehot_{tasks[int(preference.argmax())]}"
                metrics.update({f"front/{short}/{label}/{t}": float(acc[p, k]) for k, t in enumerate(tasks)})
        # kept only when whole: a stop half-way leaves the last evaluation's
        self.preferences, self.front, self.metrics = preferences, front, metrics
        self.evaluations += 1
        self.evaluated_at = trainer.global_step

    @staticmethod
    def _log_volume(metrics: dict[str, float], key: str, volume: HypervolumeValue) -> None:
        """The value under ``key``; for an approximation (many tasks) also its error, ``<key>_error`` (~95%)."""
        metrics[key] = volume.value
        if volume.method != "exact":
            metrics[f"{key}_error"] = volume.error

    def _reference_point(self, data: Any, pl_module: L.LightningModule) -> np.ndarray | None:
        """The hypervolume's reference point on the evaluated split (None for accuracy), computed once."""
        if self._reference is None and not score_of(data).higher_is_better:
            tv = self._original_task_vectors(data, pl_module)
            self._reference = reference_point(tv, data, self.split)
        return self._reference

    def _individual_scores(self, data: Any, pl_module: L.LightningModule) -> np.ndarray | None:
        """Each fine-tuned model θ0 + τ_k on task k of the evaluated split (computed once)."""
        if self._individual is None:
            tv = self._original_task_vectors(data, pl_module)
            if tv is not None:
                self._individual = individual_scores(tv, data, self.split)
        return self._individual

    def _references(self, data: Any, pl_module: L.LightningModule) -> dict[str, np.ndarray]:
        """The figures' reference scores ``[K]`` on the evaluated split: θ0 with its heads (zero-shot) and each
        fine-tuned model on its own task (individual), each computed once; none without the original task vectors."""
        if self._zero_shot is None:
            tv = self._original_task_vectors(data, pl_module)
            if tv is None:
                return {}
            self._zero_shot = zero_shot_scores(tv, data, self.split)
        return {"zero-shot": self._zero_shot, "individual": self._individual_scores(data, pl_module)}

    @staticmethod
    def _original_task_vectors(data: Any, pl_module: L.LightningModule) -> Any:
        """The datamodule's task vectors (not TIES-preprocessed), else the module's when it has them."""
        provider = getattr(data, "task_vectors", None)
        if provider is not None:
            return provider().to(pl_module.device)
        tv = pl_module.task_vectors
        return tv if tv.has_task_vectors else None

    def _baseline_overlays(self, data: Any, pl_module: L.LightningModule) -> list[Overlay]:
        """Task Arithmetic and AdaMerging, evaluated once (they do not change while training)."""
        if self._overlays is None:
            overlays = []
            tasks = list(pl_module.task_vectors.task_names)
            tv = self._original_task_vectors(data, pl_module) if self.baselines else None
            if tv is not None:
                overlays.append(Overlay("Task Arithmetic", static_point("task_arithmetic", tv, data, self.split)))
            if self.adamerging_ckpt:
                from paretomerge.modules import AdaMerging

                net = AdaMerging.load_from_checkpoint(self.adamerging_ckpt, map_location=pl_module.device).at()
                if list(net.task_names) != tasks:
                    raise ValueError(f"adamerging_ckpt {self.adamerging_ckpt!r} has tasks {list(net.task_names)}, "
                                     f"this run has {tasks}")
                accuracy = data.evaluate(net, split=self.split)
                overlays.append(Overlay("AdaMerging", np.array([[accuracy[t] for t in tasks]])))
            self._overlays = overlays
        return list(self._overlays)

    @staticmethod
    def _map_overlays(trainer: L.Trainer) -> list[Overlay]:
        from paretomerge.callbacks.map_baseline import MAPBaseline

        overlays = []
        for callback in trainer.callbacks:
            if isinstance(callback, MAPBaseline) and callback.last is not None:
                ceiling = 1.0 if score_of(trainer.datamodule).percent else None  # a surrogate may overshoot [0, 1]
                overlays.append(Overlay("MAP predicted", np.clip(callback.last["predicted"], 0.0, ceiling)))
                overlays.append(Overlay("MAP real", callback.last["real"]))
        return overlays

    # ------------------------------------------------------------------ logging
    @rank_zero_only
    def _log_front(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._usable(trainer, pl_module) or not self._evaluate(trainer, pl_module):
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=step)
        self._log_figures(trainer, pl_module, "front", step)

    def _log_figures(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, step: int) -> None:
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not writers:
            return
        start = time.perf_counter()
        data = _StopOnSigterm(trainer)
        tasks = list(pl_module.task_vectors.task_names)
        acc, prefs = self.front.numpy(), self.preferences.numpy()
        try:  # the baselines and references are evaluated at the first drawing
            overlays = self._baseline_overlays(data, pl_module) + self._map_overlays(trainer)
            references = self._references(data, pl_module)
        except _Stopped:
            rank_zero_info(f"ParetoFrontLogger: SIGTERM; the {prefix} figures of step {step} are not drawn")
            return
        title = f"{type(pl_module).__name__}, step {step}, {self.split} split"
        score = score_of(trainer.datamodule)
        figures = front_figures(acc, prefs, tasks, overlays, title=title, references=references, score=score)
        table = front_table(acc, prefs, tasks, markdown=True, score=score)
        for writer in writers:
            for name, figure in figures.items():
                tag = f"{prefix}/figure" if name == "front" else f"{prefix}/{name}"
                writer.add_figure(tag, figure, global_step=step, close=False)
            writer.add_text(f"{prefix}/table", table, global_step=step)
            writer.flush()
        self.seconds["figures"] += time.perf_counter() - start

    @rank_zero_only
    def _log_final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._usable(trainer, pl_module):
            return
        if self.evaluated_at != trainer.global_step:  # no evaluation at the last step: evaluate now
            if getattr(trainer, "received_sigterm", False) or not self._evaluate(trainer, pl_module):
                rank_zero_info("ParetoFrontLogger: SIGTERM; the final front is left to a fit resumed from the "
                               "checkpoint")
                return
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)
        self._log_figures(trainer, pl_module, "front/final", trainer.global_step)
        score = score_of(trainer.datamodule)
        short = "acc" if score.name == "accuracy" else score.name
        final = {key.replace("front/", "final/", 1): value for key, value in self.metrics.items()
                 if not key.startswith((f"front/{short}/", "front/reference/"))}
        final[f"final/mean_{score.name}_equal"] = float(self.front[0].mean())
        # The HParams tab keeps the first hyperparameter summary of a run: with the logger's default_hp_metric
        # on, Lightning wrote one at fit start whose only metric is hp_metric, so that one carries the result.
        final["hp_metric"] = final.get("final/hypervolume_normalised",
                                       final.get("final/hypervolume", final[f"final/mean_{score.name}_equal"]))
        params = dict(pl_module.hparams)
        datamodule_hparams = getattr(trainer.datamodule, "hparams", None)
        if datamodule_hparams:
            params.update({f"data/{k}": v for k, v in datamodule_hparams.items()})
        params["global_step"] = trainer.global_step
        for logger in trainer.loggers:
            logger.log_hyperparams(params, metrics=final) if isinstance(logger, TensorBoardLogger) \
                else logger.log_metrics(final, step=trainer.global_step)
