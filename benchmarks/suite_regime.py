"""Is the embedded suite in CLIP's regime? One table per seed: zero-shot θ0, individual, Task Arithmetic, TIES,
weight averaging, AdaMerging, the per-task Spearman correlation of entropy with accuracy over random merges, ‖τ_k‖/‖θ0‖
and the build's wall time; then the issue's targets, each marked met or not.

    python benchmarks/suite_regime.py                          # seeds 0, 1, 2; builds what is not cached (~5 min/seed)
    python benchmarks/suite_regime.py --seeds 0 --fresh        # build into a temporary cache, to time a fresh build
    python benchmarks/suite_regime.py --tasks colour digit     # a subset
    python benchmarks/suite_regime.py --recipe '{"finetune_lr": 1e-3}'   # another recipe

CLIP ViT-B/32 on its 8 tasks, for reference (Ilharco et al.; Yadav et al.; Yang et al.): zero-shot 48.1, individual
90.5, Task Arithmetic 69.1, TIES 72.4, weight averaging 65.8, AdaMerging 80.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings

import lightning as L
import numpy as np
import torch
from scipy.stats import spearmanr

from paretomerge import AdaMerging
from paretomerge.kernels import forward_features
from paretomerge.objectives import entropy
from paretomerge.static import static_model, task_wise
from paretomerge.suites import TinySuite

CLIP_REFERENCE = {"zero-shot θ0": 48.1, "individual": 90.5, "Task Arithmetic": 69.1, "TIES (sum)": 72.4,
                  "weight averaging": 65.8, "AdaMerging (batch 32)": 80.1}
RANDOM_MERGES = 24
MERGE_RANGE = (0.0, 0.6)  # task-wise coefficients c_k ~ U[0, 0.6], around Task Arithmetic's 0.3


def accuracy_and_entropy(suite: TinySuite, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Test accuracy and mean prediction entropy per task, ``[K]`` each, of the merged parameters."""
    tv = suite.task_vectors()
    accuracies, entropies = [], []
    with torch.no_grad():
        for task, (images, labels) in suite.labeled("test").items():
            logits = tv.heads[task](forward_features(tv.backbone, params, images))
            accuracies.append(float((logits.argmax(-1) == labels).float().mean()))
            entropies.append(float(entropy(logits)))
    return np.array(accuracies), np.array(entropies)


def adamerging(suite: TinySuite, steps: int, batch_size: int) -> tuple[np.ndarray, float]:
    """Layer-wise AdaMerging with the SPEC defaults for ``steps`` steps on ``batch_size`` images per task: test accuracy
    per task, and wall seconds."""
    model = AdaMerging()
    suite = TinySuite(**{**suite.hparams, "batch_size": batch_size})  # the same cached suite, other batches
    start = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              num_sanity_val_steps=0).fit(model, datamodule=suite)
    seconds = time.perf_counter() - start
    result = suite.evaluate(model.at())
    return np.array([result[t] for t in suite.tasks]), seconds


def spearman(suite: TinySuite, seed: int) -> tuple[np.ndarray, float]:
    """Spearman(entropy, accuracy) per task and of the task means, over seeded random task-wise merges."""
    tv = suite.task_vectors()
    rng = np.random.default_rng(seed)
    accuracies, entropies = [], []
    for _ in range(RANDOM_MERGES):
        a, e = accuracy_and_entropy(suite, task_wise(tv, rng.uniform(*MERGE_RANGE, tv.num_tasks)))
        accuracies.append(a)
        entropies.append(e)
    accuracies, entropies = np.array(accuracies), np.array(entropies)
    per_task = np.array([spearmanr(entropies[:, k], accuracies[:, k]).statistic for k in range(tv.num_tasks)])
    return per_task, float(spearmanr(entropies.mean(1), accuracies.mean(1)).statistic)


def run_seed(seed: int, args: argparse.Namespace, cache_dir: str | None) -> dict:
    suite = TinySuite(tasks=args.tasks, seed=seed, recipe=json.loads(args.recipe), cache_dir=cache_dir,
                      progress=False)
    start = time.perf_counter()
    tv = suite.task_vectors()
    wall = time.perf_counter() - start
    report = suite.build_report
    tasks = list(tv.task_names)
    column = {name: np.array([report["tasks"][t][key] for t in tasks]) for name, key in (
        ("zero-shot θ0", "zero_shot_accuracy"), ("individual", "individual_accuracy"),
        ("Task Arithmetic", "task_arithmetic_accuracy"), ("TIES (sum)", "ties_accuracy"),
        ("weight averaging", "weight_averaging_accuracy"))}
    ties_mean = suite.evaluate(static_model("ties", tv, aggregate="mean"))
    column["TIES (mean)"] = np.array([ties_mean[t] for t in tasks])
    column["AdaMerging"], ada_seconds = adamerging(suite, args.ada_steps, 16)
    column["AdaMerging (batch 32)"], ada32_seconds = adamerging(suite, args.ada_steps, 32)
    rho, rho_mean = spearman(suite, seed)
    tau = np.array([report["tasks"][t]["tau_norm_ratio"] for t in tasks])
    return {"seed": seed, "tasks": tasks, "rows": column, "spearman": rho, "spearman_mean": rho_mean, "tau": tau,
            "build_seconds": report["build_seconds"], "load_seconds": wall, "ada_seconds": (ada_seconds, ada32_seconds),
            "unseen": report["unseen_tasks"]}


def print_seed(result: dict) -> list[tuple[str, bool, str]]:
    tasks, rows = result["tasks"], result["rows"]
    print(f"\n### Seed {result['seed']}\n")
    print("| | " + " | ".join(tasks) + " | mean | CLIP ViT-B/32 |\n|" + " --- |" * (len(tasks) + 3))
    for name, values in rows.items():
        reference = CLIP_REFERENCE.get(name)
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | **{100 * values.mean():.1f}** | "
              + (f"{reference}" if reference is not None else "") + " |")
    print("| Spearman(entropy, accuracy) | " + " | ".join(f"{r:+.2f}" for r in result["spearman"])
          + f" | {result['spearman_mean']:+.2f} (of the means) | |")
    print("| ‖τ_k‖/‖θ0‖ (%) | " + " | ".join(f"{100 * t:.1f}" for t in result["tau"])
          + f" | {100 * result['tau'].mean():.1f} | |")
    unseen = ", ".join(f"{t} {100 * r['zero_shot_accuracy']:.1f}% ({r['num_classes']} classes)"
                       for t, r in result["unseen"].items())
    print(f"\nBuild {result['build_seconds']:.0f} s (as recorded when it was built; this run loaded it in "
          f"{result['load_seconds']:.1f} s); AdaMerging {result['ada_seconds'][0]:.0f} s at batch 16, "
          f"{result['ada_seconds'][1]:.0f} s at 32 (per task per step). Unseen tasks, zero-shot: "
          f"{unseen or 'none'}.")
    mean = {name: 100 * values.mean() for name, values in rows.items()}
    gap = 100 * (rows["individual"] - rows["zero-shot θ0"])
    checks = [
        ("individual: mean ≥ 90, every task ≥ 80", mean["individual"] >= 90 and rows["individual"].min() >= 0.8,
         f"mean {mean['individual']:.1f}, lowest {100 * rows['individual'].min():.1f}"),
        ("zero-shot: every task ≥ 10 below its individual model", gap.min() >= 10, f"smallest gap {gap.min():.1f}"),
        ("Task Arithmetic ≥ zero-shot + 5 (mean)", mean["Task Arithmetic"] >= mean["zero-shot θ0"] + 5,
         f"{mean['Task Arithmetic'] - mean['zero-shot θ0']:+.1f}"),
        ("Task Arithmetic ≤ individual − 10 (mean)", mean["Task Arithmetic"] <= mean["individual"] - 10,
         f"{mean['Task Arithmetic'] - mean['individual']:+.1f}"),
        ("TIES (sum) ≥ Task Arithmetic", mean["TIES (sum)"] >= mean["Task Arithmetic"],
         f"{mean['TIES (sum)'] - mean['Task Arithmetic']:+.1f}"),
        ("AdaMerging ≥ Task Arithmetic + 5", mean["AdaMerging"] >= mean["Task Arithmetic"] + 5,
         f"{mean['AdaMerging'] - mean['Task Arithmetic']:+.1f}"),
        ("Spearman ≤ −0.5 for every task", result["spearman"].max() <= -0.5,
         f"highest {result['spearman'].max():+.2f}"),
        ("Spearman ≤ −0.7 of the means", result["spearman_mean"] <= -0.7, f"{result['spearman_mean']:+.2f}"),
        ("fresh build ≤ 180 s", result["build_seconds"] <= 180, f"{result['build_seconds']:.0f} s"),
    ]
    print("\n| target | met | measured |\n| --- | --- | --- |")
    for name, met, measured in checks:
        print(f"| {name} | {'yes' if met else '**no**'} | {measured} |")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="*", default=None, help="TinySuite tasks (default: all eight)")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of the suite's Recipe")
    parser.add_argument("--ada-steps", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="build into a temporary cache (times a fresh build)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|litlogger).*")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("## The embedded suite against CLIP's regime (test accuracy, %)")
    summary = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            result = run_seed(seed, args, scratch if args.fresh else args.cache_dir)
            summary[seed] = print_seed(result)
    print("\n### Targets met, per seed\n\n| target | " + " | ".join(f"seed {s}" for s in summary) + " |\n|"
          + " --- |" * (len(summary) + 1))
    for i, (name, _, _) in enumerate(next(iter(summary.values()))):
        print(f"| {name} | " + " | ".join(("yes" if checks[i][1] else "**no**") + f" ({checks[i][2]})"
                                          for checks in summary.values()) + " |")


if __name__ == "__main__":
    main()
