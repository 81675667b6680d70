"""`FitSummary`: at the end of `fit`, evaluate the learned Pareto set on the labeled test split and say what
was learned, where it was saved, and how to use it.

It needs a datamodule with ``evaluate(net) -> {task: accuracy}`` (as `TinySuite` has); a ``build_report``
(individual and Task Arithmetic accuracy per task) adds the comparison columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

import paretomerge
from paretomerge.front import evaluate_front, preference_aware, static_front, summary_preferences
from paretomerge.modules import ParetoMerging
from paretomerge.pareto import hypervolume, non_dominated
from paretomerge.plotting import write_front_csv


def run_directory(trainer: L.Trainer) -> Path:
    """Where the run's files go: the first logger's directory, else the trainer's root. Unlike ``trainer.log_dir``
    it is no collective, so rank-zero-only code may call it under DDP (the other ranks are not there to answer)."""
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    return Path(log_dir or trainer.default_root_dir)


def volumes(front: torch.Tensor, individual: list[float] | None) -> tuple[float, float | None]:
    """The hypervolume of ``front`` and, with the individual accuracies, its normalised hypervolume."""
    return hypervolume(front), (hypervolume(front, individual) if individual else None)


def stored_set(path: Path, module: L.LightningModule) -> str:
    """What the `.ckpt` at ``path`` costs against θ0 and the heads, and what its preference basis holds."""
    tv = module.task_vectors
    one = sum(t.numel() * t.element_size() for m in (tv.backbone, tv.heads) for t in m.state_dict().values())
    size = path.stat().st_size
    line = f"Stored Pareto set: {path.name} is {size / 2**20:.2f} MiB, {size / one:.2f}x (θ0 + heads) with Adam's state"
    basis = module.preference_basis() if getattr(module, "preference_conditioned", False) else None
    if basis is None:
        return line + "."
    rank = module.hparams.get("basis_rank")
    kind = "the full task vectors" if rank is None else f"int8 SVD factors of each task vector at basis_rank={rank}"
    line += f"; its preference basis is {kind}, {basis.nbytes() / 2**20:.2f} MiB"
    if rank is not None and tv.has_task_vectors:
        line += (f", {100 * basis.kept(tv.tau):.1f}% of the task vectors' squared norm (the full basis, "
                 f"basis_rank=None, would be {tv.nbytes() / 2**20:.2f} MiB; what the rank costs: docs/method.md, "
                 "'The compact Pareto set')")
    return line + "."


def describe(module: L.LightningModule) -> str:
    """How the summary names ``module``: Pareto Merging with its configuration (ours or the paper's), else its class."""
    if type(module) is not ParetoMerging:
        return type(module).__name__
    hp = module.hparams
    parts = ["preference-conditioned coefficients"] if hp.get("preference_coefficients") else []
    parts += [f"diversity term β_div={hp['beta_div']:g}"] if hp.get("beta_div", 0) > 0 else []
    return "Pareto Merging, " + (f"ours ({', '.join(parts)})" if parts else "the paper's configuration")


def loading_lines(module: L.LightningModule, path: str, at_call: str, tasks: list[str]) -> list[str]:
    """How to use the checkpoint: the import and loading call of ``module``'s own class, then ``at``."""
    cls = type(module)
    package = "paretomerge" if getattr(paretomerge, cls.__name__, None) is cls else cls.__module__
    return ["Use it:",
            f"    from {package} import {cls.__name__}",
            f"    model = {cls.__name__}.load_from_checkpoint({str(path or 'path/to.ckpt')!r})",
            f"    {at_call}",
            f"    logits = net(images, task={tasks[0]!r})  # images [B, 3, H, W]"]


class FitSummary(L.Callback):
    """Prints, after ``fit``: per-task test accuracy at the equal preference and at each task's one-hot,
    beside the individual fine-tuned models and Task Arithmetic; the hypervolume of the evaluated front
    (SPEC §4); where the checkpoint and the logs are; and how to call ``at()``. The front is also written
    to ``<log_dir>/front_test.csv`` and its hypervolume to the logger.

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
        if not preference_aware(pl_module):  # one model (AdaMerging): no front to evaluate
            print(self._single_model_table(tasks, datamodule, pl_module, trainer))
            return
        self.preferences = summary_preferences(num_tasks, self.seed)
        self.front = evaluate_front(pl_module, datamodule, self.preferences, trainer.progress_bar_callback is not None)
        report = getattr(datamodule, "build_report", None)
        individual = [report["tasks"][t]["individual_accuracy"] for t in tasks] if report else None
        hv, hv_normalised = volumes(self.front, individual)
        self.reference_front, reference_volumes = None, None
        if pl_module.task_vectors.has_task_vectors:  # Task Arithmetic + preference on the same preferences
            self.reference_front = static_front("task_arithmetic_preference", pl_module.task_vectors, datamodule,
                                                self.preferences)
            reference_volumes = volumes(self.reference_front, individual)
        log_dir = run_directory(trainer)
        write_front_csv(log_dir / "front_test.csv", self.front.numpy(), self.preferences.numpy(), tasks)
        if trainer.logger is not None:
            metrics = {"test/front/hypervolume": hv, "test/front/mean_accuracy_equal": float(self.front[0].mean())}
            if hv_normalised is not None:
                metrics["test/front/hypervolume_normalised"] = hv_normalised
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        print(self._table(tasks, report, hv, hv_normalised, reference_volumes, trainer, log_dir))

    @staticmethod
    def _baseline_columns(report: dict | None, tasks: list[str]) -> list[tuple[str, list[float]]]:
        """Zero-shot θ0, the fine-tuned models and Task Arithmetic, from the suite's build report when it has them."""
        columns = []
        for name, key in (("zero-shot", "zero_shot_accuracy"), ("individual", "individual_accuracy"),
                          ("task arith.", "task_arithmetic_accuracy"), ("TIES", "ties_accuracy")):
            if report and all(key in report["tasks"][t] for t in tasks):
                columns.append((name, [report["tasks"][t][key] for t in tasks]))
        return columns

    def _single_model_table(self, tasks: list[str], datamodule: Any, pl_module: L.LightningModule,
                            trainer: L.Trainer) -> str:
        accuracy = datamodule.evaluate(pl_module.at())
        self.front = torch.tensor([[accuracy[t] for t in tasks]], dtype=torch.float64)
        report = getattr(datamodule, "build_report", None)
        columns: list[tuple[str, list[float]]] = []
        columns += self._baseline_columns(report, tasks)
        columns.append((type(pl_module).__name__, self.front[0].tolist()))
        header = f"{'task':<12}" + "".join(f"{name:>13}" for name, _ in columns)
        lines = ["", f"{type(pl_module).__name__}: test accuracy (%) per task", header, "-" * len(header)]
        for k, task in enumerate(tasks):
            lines.append(f"{task:<12}" + "".join(f"{100 * values[k]:>13.1f}" for _, values in columns))
        lines.append(f"{'mean':<12}" + "".join(f"{100 * sum(v) / len(tasks):>13.1f}" for _, v in columns))
        checkpoint = trainer.checkpoint_callback
        path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        if path:
            lines.append(f"Checkpoint: {path}")
        return "\n".join(lines + loading_lines(pl_module, path, "net = model.at()", tasks) + [""])

    def _table(self, tasks: list[str], report: dict | None, hv: float, hv_normalised: float | None,
               reference_volumes: tuple[float, float | None] | None, trainer: L.Trainer, log_dir: Path) -> str:
        front, num_tasks = self.front, len(tasks)
        equal = front[0]
        own = torch.stack([front[1 + k, k] for k in range(num_tasks)])  # task k at the one-hot e_k
        header = f"{'task':<12}"
        columns: list[tuple[str, list[float]]] = []
        columns += self._baseline_columns(report, tasks)
        short = "PM" if isinstance(trainer.lightning_module, ParetoMerging) else type(trainer.lightning_module).__name__
        columns += [(f"{short} equal", equal.tolist()), (f"{short} one-hot", own.tolist())]
        header += "".join(f"{name:>13}" for name, _ in columns) + f"{'one-hot - equal':>17}"
        lines = ["", f"{describe(trainer.lightning_module)}: test accuracy (%) per task", header, "-" * len(header)]
        for k, task in enumerate(tasks):
            lines.append(f"{task:<12}" + "".join(f"{100 * values[k]:>13.1f}" for _, values in columns)
                         + f"{100 * (own[k] - equal[k]):>+17.1f}")
        lines.append("-" * len(header))
        means = [sum(values) / num_tasks for _, values in columns]
        lines.append(f"{'mean':<12}" + "".join(f"{100 * m:>13.1f}" for m in means)
                     + f"{100 * float((own - equal).mean()):>+17.1f}")
        better = int((own > equal).sum())
        lines += [
            "",
            f"'{short} equal' is at(equal preference); '{short} one-hot' is task k's accuracy at at(e_k), the "
            f"preference that puts all weight on task k; it beats the equal preference for {better} of {num_tasks} "
            "tasks.",
            f"Front: {front.shape[0]} preferences (SPEC §4), {len(non_dominated(front))} non-dominated; hypervolume "
            f"{hv:.4f}" + (f", normalised by individual accuracy {hv_normalised:.4f}" if hv_normalised else "")
            + f". Every point: {log_dir / 'front_test.csv'}",
        ]
        if reference_volumes is not None:
            reference_hv, reference_normalised = reference_volumes
            lines.append(f"Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k) on the same preferences: hypervolume "
                         f"{reference_hv:.4f}" + (f", normalised {reference_normalised:.4f}"
                                                  if reference_normalised is not None else ""))
        checkpoint = trainer.checkpoint_callback
        path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        if path:
            lines.append(f"Checkpoint: {path}")
            lines.append(stored_set(Path(path), trainer.lightning_module))
        if trainer.logger is not None:
            lines.append(f"Logs: tensorboard --logdir {Path(trainer.logger.save_dir)}")
        example = ", ".join(["1.0"] + ["0.0"] * (num_tasks - 1))
        at = f"net = model.at([{example}])  # one weight per task: {', '.join(tasks)}"
        return "\n".join(lines + loading_lines(trainer.lightning_module, path, at, tasks) + [""])
