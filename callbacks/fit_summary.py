"""`FitSummary`: at the end of `fit`, evaluate the learned Pareto set on the labeled test split and say what
was learned, where it was saved, and how to use it.

It needs a datamodule with ``evaluate(net) -> {task: score}`` (as `TinySuite` has: accuracy; a language model suite's
is the next-token loss, printed as perplexity, `paretomerge.pareto.score_of`); a ``build_report`` (θ0, individual,
Task Arithmetic and TIES scores per task) adds the comparison columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

import paretomerge
from paretomerge.front import (
    describe_reference,
    evaluate_front,
    preference_aware,
    reference_point,
    static_front,
    summary_preferences,
)
from paretomerge.modules import ParetoMerging
from paretomerge.pareto import (
    ACCURACY,
    HypervolumeValue,
    Score,
    individual_gains,
    measure_hypervolume,
    non_dominated,
    score_of,
)
from paretomerge.plotting import write_front_csv


def run_directory(trainer: L.Trainer) -> Path:
    """Where the run's files go: the first logger's directory, else the trainer's root. Unlike ``trainer.log_dir``
    it is no collective, so rank-zero-only code may call it under DDP (the other ranks are not there to answer)."""
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    return Path(log_dir or trainer.default_root_dir)


def volumes(front: torch.Tensor, individual: list[float] | None, score: Score = ACCURACY,
            reference: np.ndarray | None = None) -> tuple[HypervolumeValue, HypervolumeValue | None]:
    """The hypervolume of ``front`` (of the gains over ``reference``, `paretomerge.pareto.measure_hypervolume`: exact,
    or approximate with its error at many tasks) and, with the individual models' scores, its normalised hypervolume
    (each task's gain divided by its individual model's)."""
    scale = individual_gains(individual, score, reference) if individual else None
    normalised = measure_hypervolume(front, scale, score, reference) \
        if scale is not None and (scale > 0).all() else None
    return measure_hypervolume(front, score=score, reference=reference), normalised


def stored_set(path: Path, module: L.LightningModule) -> str:
    """What the `.ckpt` at ``path`` costs against θ0 and the heads, and what its preference basis holds."""
    tv = module.task_vectors
    one = sum(t.numel() * t.element_size() for m in (tv.backbone, tv.heads) for t in m.state_dict().values())
    size = path.stat().st_size
    line = f"Stored Pareto set: {path.name} is {size / 2**20:.2f} MiB, {size / one:.2f}x (θ0 + heads) with Adam's state"
    buffers = buffers_line(tv)
    basis = module.preference_basis() if getattr(module, "preference_conditioned", False) else None
    if basis is None:
        return line + "." + buffers
    rank = module.hparams.get("basis_rank")
    kind = "the full task vectors" if rank is None else f"int8 SVD factors of each task vector at basis_rank={rank}"
    line += f"; its preference basis is {kind}, {basis.nbytes() / 2**20:.2f} MiB"
    if rank is not None and tv.has_task_vectors:
        line += (f", {100 * basis.kept(tv.tau):.1f}% of the task vectors' squared norm (the full basis, "
                 f"basis_rank=None, would be {tv.nbytes() / 2**20:.2f} MiB; what the rank costs: docs/method.md, "
                 "'The compact Pareto set')")
    return line + "." + buffers


def buffers_line(tv: Any) -> str:
    """What the stored set does with BatchNorm's running statistics (`kernels.buffers`); empty without float
    buffers."""
    if not tv.buffer_tau:
        return ""
    said = {"pretrained": "kept from θ0",
            "merged": "merged with their layers' coefficients",
            "recomputed": f"recomputed for each at() on {0 if tv.calibration is None else len(tv.calibration)} "
                          "stored unlabeled images of every task"}[tv.buffer_policy]
    return f" BatchNorm's running statistics ({len(tv.buffer_tau)} float buffers): buffer_policy={tv.buffer_policy}, " \
           f"{said} (docs/cnn.md)."


def describe(module: L.LightningModule, score: Score = ACCURACY) -> str:
    """How the summary names ``module``: Pareto Merging with its configuration (ours or the paper's), else its class;
    for a language model, with the objective it minimised (the diversity term, which token batches do not use, is
    left out)."""
    hp = module.hparams
    objective = "" if score.higher_is_better else \
        f", objective: next-token {'entropy' if hp.get('objective') == 'entropy' else 'loss'}"
    if type(module) is not ParetoMerging:
        return type(module).__name__ + objective
    parts = ["preference-conditioned coefficients"] if hp.get("preference_coefficients") else []
    parts += [f"diversity term β_div={hp['beta_div']:g}"] if hp.get("beta_div", 0) > 0 and score.higher_is_better \
        else []
    return "Pareto Merging, " + (f"ours ({', '.join(parts)})" if parts else "the paper's configuration") + objective


def loading_lines(module: L.LightningModule, path: str, at_call: str, tasks: list[str],
                  score: Score = ACCURACY) -> list[str]:
    """How to use the checkpoint: the import and loading call of ``module``'s own class, then ``at`` (and, for a
    language model, how to write the chosen model out as a Hugging Face directory)."""
    cls = type(module)
    package = "paretomerge" if getattr(paretomerge, cls.__name__, None) is cls else cls.__module__
    lines = ["Use it:",
             f"    from {package} import {cls.__name__}",
             f"    model = {cls.__name__}.load_from_checkpoint({str(path or 'path/to.ckpt')!r})",
             f"    {at_call}"]
    if score.higher_is_better:
        return lines + [f"    logits = net(images, task={tasks[0]!r})  # images [B, 3, H, W]"]
    return lines + ["    logits = net(tokens)  # tokens: a tokenizer's output (input_ids, attention_mask); [B, T, V]",
                    "    net.save_pretrained('merged/', tokenizer=tokenizer)  # AutoModelForCausalLM.from_pretrained",
                    f"or: paretomerge export --ckpt {str(path or 'path/to.ckpt')} --at "
                    + ",".join(["1"] + ["0"] * (len(tasks) - 1)) + " --format hf --out merged/"]


class FitSummary(L.Callback):
    """Prints, after ``fit``: per-task test scores (accuracy, or a language model's perplexity) at the equal preference
    and at each task's one-hot, beside θ0, the individual fine-tuned models, Task Arithmetic and TIES; the hypervolume
    of the evaluated front (SPEC §4; for a loss, of the gains over θ0's per-task test loss, which it states) beside Task
    Arithmetic + preference's on the same preferences; where the checkpoint and the logs are; and how to call
    ``at()``. The front is also written to ``<log_dir>/front_test.csv`` and its hypervolume to the logger.

    seed: seeds the Dirichlet part of the preference set (K >= 4).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.front: torch.Tensor | None = None  # Acc [P, K] of the last fit
        self.preferences: torch.Tensor | None = None
        self.reference_front: torch.Tensor | None = None  # Task Arithmetic + preference, Acc [P, K]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarise(trainer, pl_module)

    @rank_zero_only
    def _summarise(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "evaluate"):
            rank_zero_warn("FitSummary: the datamodule has no evaluate(net); no summary printed")
            return
        tasks = list(pl_module.task_vectors.task_names)
        num_tasks = len(tasks)
        score = score_of(datamodule)
        if not preference_aware(pl_module):  # one model (AdaMerging): no front to evaluate
            print(self._single_model_table(tasks, datamodule, pl_module, trainer, score))
            return
        self.preferences = summary_preferences(num_tasks, self.seed)
        self.front = evaluate_front(pl_module, datamodule, self.preferences, trainer.progress_bar_callback is not None)
        report = getattr(datamodule, "build_report", None)
        key = f"individual_{score.name}"
        individual = [report["tasks"][t][key] for t in tasks] if report and all(
            key in report["tasks"][t] for t in tasks) else None
        tv = pl_module.task_vectors
        reference = reference_point(tv if tv.has_task_vectors else None, datamodule, "test", report)
        measured = score.higher_is_better or reference is not None  # a loss front without θ0's loss has no HV
        hv, hv_normalised = volumes(self.front, individual, score, reference) if measured else (None, None)
        self.reference_front, reference_volumes = None, None
        if tv.has_task_vectors:  # Task Arithmetic + preference on the same preferences
            self.reference_front = static_front("task_arithmetic_preference", tv, datamodule, self.preferences)
            reference_volumes = volumes(self.reference_front, individual, score, reference) if measured else None
        log_dir = run_directory(trainer)
        write_front_csv(log_dir / "front_test.csv", self.front.numpy(), self.preferences.numpy(), tasks, score=score)
        if trainer.logger is not None:
            metrics = {f"test/front/mean_{score.name}_equal": float(self.front[0].mean())}
            for key, value in (("hypervolume", hv), ("hypervolume_normalised", hv_normalised)):
                if value is not None:
                    metrics[f"test/front/{key}"] = value.value
                    if value.method != "exact":
                        metrics[f"test/front/{key}_error"] = value.error
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        print(self._table(tasks, report, hv, hv_normalised, reference_volumes, trainer, log_dir, score,
                          describe_reference(reference, tasks, datamodule)))

    @staticmethod
    def _baseline_columns(report: dict | None, tasks: list[str], score: Score) -> list[tuple[str, list[float]]]:
        """θ0 (zero-shot for a classifier with its heads, pretrained for a language model), the fine-tuned models, Task
        Arithmetic and TIES, from the suite's build report when it has them (keys ``<column>_<score name>``)."""
        columns = []
        for name, key in (("zero-shot" if score.higher_is_better else "pretrained", "zero_shot"),
                          ("individual", "individual"), ("task arith.", "task_arithmetic"), ("TIES", "ties")):
            key = f"{key}_{score.name}"
            if report and all(key in report["tasks"][t] for t in tasks):
                columns.append((name, [report["tasks"][t][key] for t in tasks]))
        return columns

    @staticmethod
    def _mean(values: list[float], score: Score) -> float:
        """A column's mean as the table prints it: of the accuracies, or the perplexity of the mean loss."""
        return float(score.tabulated(float(np.mean(values))))

    def _single_model_table(self, tasks: list[str], datamodule: Any, pl_module: L.LightningModule,
                            trainer: L.Trainer, score: Score) -> str:
        scores = datamodule.evaluate(pl_module.at())
        self.front = torch.tensor([[scores[t] for t in tasks]], dtype=torch.float64)
        report = getattr(datamodule, "build_report", None)
        columns: list[tuple[str, list[float]]] = []
        columns += self._baseline_columns(report, tasks, score)
        columns.append((type(pl_module).__name__, self.front[0].tolist()))
        header = f"{'task':<12}" + "".join(f"{name:>13}" for name, _ in columns)
        lines = ["", f"{describe(pl_module, score)}: test {score.tabulated_name} per task", header, "-" * len(header)]
        for k, task in enumerate(tasks):
            lines.append(f"{task:<12}" + "".join(f"{float(score.tabulated(values[k])):>13.{self._digits(score)}f}"
                                                 for _, values in columns))
        lines.append(f"{'mean':<12}" + "".join(f"{self._mean(v, score):>13.{self._digits(score)}f}"
                                               for _, v in columns))
        checkpoint = trainer.checkpoint_callback
        path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        if path:
            lines.append(f"Checkpoint: {path}")
        return "\n".join(lines + loading_lines(pl_module, path, "net = model.at()", tasks, score) + [""])

    @staticmethod
    def _digits(score: Score) -> int:
        return 1 if score.percent else 2

    def _table(self, tasks: list[str], report: dict | None, hv: HypervolumeValue | None,
               hv_normalised: HypervolumeValue | None,
               reference_volumes: tuple[HypervolumeValue, HypervolumeValue | None] | None, trainer: L.Trainer,
               log_dir: Path, score: Score = ACCURACY, reference: str = "reference point 0") -> str:
        front, num_tasks, digits = self.front, len(tasks), self._digits(score)
        equal = front[0]
        own = torch.stack([front[1 + k, k] for k in range(num_tasks)])  # task k at the one-hot e_k
        header = f"{'task':<12}"
        columns: list[tuple[str, list[float]]] = []
        columns += self._baseline_columns(report, tasks, score)
        short = "PM" if isinstance(trainer.lightning_module, ParetoMerging) else type(trainer.lightning_module).__name__
        columns += [(f"{short} equal", equal.tolist()), (f"{short} one-hot", own.tolist())]
        header += "".join(f"{name:>13}" for name, _ in columns) + f"{'one-hot - equal':>17}"
        lines = ["", f"{describe(trainer.lightning_module, score)}: test {score.tabulated_name} per task", header,
                 "-" * len(header)]
        shift = score.tabulated(own.numpy()) - score.tabulated(equal.numpy())
        for k, task in enumerate(tasks):
            lines.append(f"{task:<12}" + "".join(f"{float(score.tabulated(values[k])):>13.{digits}f}"
                                                 for _, values in columns) + f"{shift[k]:>+17.{digits}f}")
        lines.append("-" * len(header))
        lines.append(f"{'mean':<12}" + "".join(f"{self._mean(values, score):>13.{digits}f}" for _, values in columns)
                     + f"{self._mean(own.tolist(), score) - self._mean(equal.tolist(), score):>+17.{digits}f}")
        better = int(score.better(own.numpy(), equal.numpy()).sum())
        mean_note = "" if score.percent else " (a mean row is the perplexity of the mean loss)"
        lines += [
            "",
            f"'{short} equal' is at(equal preference); '{short} one-hot' is task k's {score.tabulated_name} at "
            f"at(e_k), the preference that puts all weight on task k; it beats the equal preference for {better} of "
            f"{num_tasks} tasks{mean_note}.",
        ]
        volume = "no hypervolume (no reference point)" if hv is None else f"hypervolume {hv.value:.4f}" + (
            f", normalised by the individual models' gains {hv_normalised.value:.4f}" if hv_normalised else "") + (
            "" if hv.method == "exact" else f"; {hv.describe()}")
        kept = len(non_dominated(front, score))
        lines.append(f"Front: {front.shape[0]} preferences (SPEC §4), {kept} non-dominated; {volume} ({reference}). "
                     f"Every point: {log_dir / 'front_test.csv'}")
        if reference_volumes is not None:
            reference_hv, reference_normalised = reference_volumes
            lines.append(f"Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k) on the same preferences: hypervolume "
                         f"{reference_hv.value:.4f}" + (f", normalised {reference_normalised.value:.4f}"
                                                        if reference_normalised is not None else "")
                         + ("" if reference_hv.method == "exact" else f" (± {reference_hv.error:.2g})"))
        checkpoint = trainer.checkpoint_callback
        path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        if path:
            lines.append(f"Checkpoint: {path}")
            lines.append(stored_set(Path(path), trainer.lightning_module))
        if trainer.logger is not None:
            lines.append(f"Logs: tensorboard --logdir {Path(trainer.logger.save_dir)}")
        example = ", ".join(["1.0"] + ["0.0"] * (num_tasks - 1))
        at = f"net = model.at([{example}])  # one weight per task: {', '.join(tasks)}"
        return "\n".join(lines + loading_lines(trainer.lightning_module, path, at, tasks, score) + [""])
