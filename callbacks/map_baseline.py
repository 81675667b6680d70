"""`MAPBaseline`: run MAP (SPEC §6) on the module's own task vectors and the datamodule's labeled validation
split, at the end of fit (or every N validations), and log its front beside Pareto Merging's.

    paretomerge fit --config configs/tiny.yaml --config configs/map.yaml

Logged (``map/...``): real evaluations spent, per-task held-out R², hypervolume of the predicted and of the
re-evaluated front, GD and IGD between predicted and real, and the win rate of the module's front (``at(p)`` on
the SPEC §4 preferences, same split) against MAP's real front. The points go to ``<log_dir>/map_front.csv``.
The metric is the datamodule's score (`paretomerge.pareto.score_of`): accuracy, or a language model's next-token loss,
which MAP minimises (surrogate case 3) and whose hypervolumes are of the gains over θ0's per-task loss on the same
split (one more evaluation, not counted as MAP's; logged as ``map/reference/<task>``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from paretomerge.callbacks.fit_summary import run_directory
from paretomerge.front import evaluate_front, preference_aware
from paretomerge.map.bayesian import bayesian_map
from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.map.nested import nested_map
from paretomerge.map.plain import plain_map
from paretomerge.map.search import nsga3_front
from paretomerge.pareto import (
    generational_distance,
    hypervolume,
    inverted_generational_distance,
    score_of,
    win_rate,
)
from paretomerge.preferences import front_preferences

VARIANTS = ("plain", "bayesian", "nested")


class MAPBaseline(L.Callback):
    """variant: ``plain`` (Algorithm 1), ``bayesian`` (Algorithm 3: ``initial`` points, then ``rounds`` of
    ``per_round``) or ``nested`` (Algorithm 2: one model per preference, for the first ``nested_preferences`` of
    the SPEC §4 set, ``points_per_pair`` scalings per pair). budget: points for plain MAP (default: the paper's for
    K). real_samples: predicted front members re-evaluated for real. every_n_validations: also run after every
    N-th validation."""

    def __init__(self, variant: str = "plain", budget: int | None = None, real_samples: int = 10,
                 every_n_validations: int | None = None, split: str = "val", bounds: tuple[float, float] = (0.0, 1.0),
                 generations: int = 300, initial: int = 20, per_round: int = 10, rounds: int = 3,
                 nested_preferences: int = 5, points_per_pair: int = 20, seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"MAP variant must be one of {VARIANTS}, got {variant!r}")
        if real_samples < 2:
            raise ValueError(f"real_samples must be at least 2, got {real_samples}")
        for name, value in (("budget", budget), ("every_n_validations", every_n_validations)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.variant, self.budget, self.real_samples = variant, budget, real_samples
        self.every_n_validations, self.split, self.bounds = every_n_validations, split, tuple(bounds)
        self.generations, self.seed = generations, seed
        self.initial, self.per_round, self.rounds = initial, per_round, rounds
        self.nested_preferences, self.points_per_pair = nested_preferences, points_per_pair
        self.validations = 0
        self.runs = 0  # how many times MAP has run
        self.last: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations, "runs": self.runs}  # a resumed fit runs MAP at the same validations

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations, self.runs = int(state_dict.get("validations", 0)), int(state_dict.get("runs", 0))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    @rank_zero_only
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tv, datamodule = pl_module.task_vectors, trainer.datamodule
        if tv is None or not tv.has_task_vectors or not hasattr(datamodule, "labeled"):
            rank_zero_warn("MAPBaseline needs the module's task vectors and a datamodule with labeled(split); skipped")
            return
        self.runs += 1
        score = score_of(datamodule)
        evaluator = MergeEvaluator(tv, datamodule.labeled(self.split), metric=score.name)
        higher = score.higher_is_better
        if self.variant == "plain":
            result = plain_map(evaluator, self.budget, bounds=self.bounds, seed=self.seed,
                               generations=self.generations)
            front_c, predicted, r2 = result.front_c, result.front_predicted, result.r2
        elif self.variant == "nested":  # one model per preference: its "front" is those models, predicted = real
            prefs = front_preferences(tv.num_tasks, self.seed)[: self.nested_preferences].numpy()
            front_c = np.stack([nested_map(evaluator, p, self.points_per_pair, bounds=self.bounds, seed=self.seed,
                                           generations=self.generations).coefficients for p in prefs])
            predicted, r2 = None, np.full(tv.num_tasks, np.nan)
        else:
            result = bayesian_map(evaluator, self.initial, self.per_round, self.rounds, bounds=self.bounds,
                                  seed=self.seed)
            front_c, predicted = nsga3_front(result.surrogates, bounds=self.bounds, generations=self.generations,
                                             seed=self.seed, higher_is_better=higher)
            r2 = np.full(tv.num_tasks, np.nan)
        spent = evaluator.count
        if predicted is None:
            picks = np.arange(len(front_c))
            real = predicted = evaluator(front_c)
        else:
            picks = np.unique(np.linspace(0, len(front_c) - 1, min(self.real_samples, len(front_c))).round()
                              .astype(int))
            real = evaluator(front_c[picks])
        checked = evaluator.count
        reference = None if higher else evaluator(np.zeros((1, tv.num_tasks)))[0]  # θ0: a loss's reference point
        predicted = np.clip(predicted, 0.0, None)
        predicted_sample = predicted[picks]
        module_front = self._module_front(pl_module, datamodule)
        metrics = {
            "map/evaluations": float(spent),
            "map/evaluations_with_real_check": float(checked),
            "map/hv_predicted": hypervolume(predicted, score=score, reference=reference),
            "map/hv_real": hypervolume(real, score=score, reference=reference),
            "map/gd_predicted_vs_real": generational_distance(predicted_sample, real, score),
            "map/igd_predicted_vs_real": inverted_generational_distance(predicted_sample, real, score),
        }
        metrics.update({f"map/r2/{t}": float(v) for t, v in zip(tv.task_names, r2, strict=True) if np.isfinite(v)})
        if reference is not None:
            metrics.update({f"map/reference/{t}": float(v) for t, v in zip(tv.task_names, reference, strict=True)})
        if module_front is not None:
            metrics["map/win_rate_module_vs_map"] = win_rate(module_front, real, score)
            metrics["map/win_rate_map_vs_module"] = win_rate(real, module_front, score)
            metrics["map/hv_module"] = hypervolume(module_front, score=score, reference=reference)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        log_dir = run_directory(trainer)
        self._write_csv(log_dir / "map_front.csv", list(tv.task_names), front_c, predicted, picks, real)
        self.last = {"metrics": metrics, "front_c": front_c, "predicted": predicted, "real": real, "picks": picks}
        metric = "" if higher else f", {score.name}"
        print(f"\nMAP ({self.variant}, {spent} real evaluations + {checked - spent} to check{metric}): "
              + ", ".join(f"{k.removeprefix('map/')} {v:.4f}" for k, v in metrics.items()
                          if "evaluations" not in k and "reference/" not in k)
              + ("" if reference is None else "; hypervolumes of the gains over θ0's per-task loss ("
                 + ", ".join(f"{t} {v:.3f}" for t, v in zip(tv.task_names, reference, strict=True)) + ")")
              + f"\nMAP front: {log_dir / 'map_front.csv'}")

    def _module_front(self, pl_module: L.LightningModule, datamodule: Any) -> np.ndarray | None:
        if not preference_aware(pl_module) or not hasattr(datamodule, "evaluate"):
            return None
        prefs = front_preferences(pl_module.task_vectors.num_tasks, self.seed)
        return evaluate_front(pl_module, datamodule, prefs, progress=False, split=self.split).numpy()

    @staticmethod
    def _write_csv(path: Path, tasks: list[str], front_c: np.ndarray, predicted: np.ndarray, picks: np.ndarray,
                   real: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        real_by_row = dict(zip(picks.tolist(), real.tolist(), strict=True))
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([f"{kind}_{t}" for kind in ("c", "predicted", "real") for t in tasks])
            for i, (c, p) in enumerate(zip(front_c.tolist(), predicted.tolist(), strict=True)):
                real_row = real_by_row.get(i, [""] * len(tasks))
                writer.writerow([f"{v:.6f}" for v in c] + [f"{v:.6f}" for v in p]
                                + [f"{v:.6f}" if v != "" else "" for v in real_row])
