"""ResNets and BatchNorm (issue 35): every method on the embedded CNN suite under each float-buffer policy, and MAP
against a grid search at K = 2 and 3 beside the same figures for the TinySuite's ViT.

For each seed and policy (``pretrained``, ``merged``, ``recomputed``; `kernels.buffers`) on `TinyResNetSuite` (3 tasks:
colour, stripes, size), test accuracy (%), mean over tasks:

- individual (each fine-tune with its own statistics), Task Arithmetic (0.3), TIES;
- MAP (plain, the paper's budget) at K = 3 on the validation split: GD and IGD of its predicted and of its real front
  (10 members re-evaluated) against the non-dominated points of a 7 × 7 × 7 grid of task-wise coefficients in [0, 1]³
  (343 points), and the mean accuracy of the real front's members; at K = 2 (the first two tasks) the same against a
  15 × 15 grid (225 points);
- AdaMerging and ours (``ParetoMerging()``'s defaults, the preference tensor on the last two stages' convolutions; both
  with ours' diversity term β_div, so that the two are like for like), ``--steps`` steps each: AdaMerging's accuracy,
  ours at the equal preference, and the hypervolume of ours' front and of Task Arithmetic + preference on the SPEC §4
  preferences (test split);
- the seconds ``recomputed`` adds: to one ``at(γ)`` and to one MAP evaluation (one model, every task), medians of
  alternating rounds against ``merged``.

``--vit`` adds MAP's K = 2 and 3 rows for the TinySuite's ViT (default recipe, the same three tasks).

    python benchmarks/resnet_buffers.py                 # seeds 0-2, every policy, and the ViT
    python benchmarks/resnet_buffers.py --seeds 0 --policies recomputed --steps 50 --no-vit
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from paretomerge import AdaMerging, ParetoMerging
from paretomerge.front import evaluate_front, individual_scores, static_front, static_point, summary_preferences
from paretomerge.kernels.buffers import BUFFER_POLICIES
from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.map.plain import plain_map
from paretomerge.pareto import generational_distance, hypervolume, inverted_generational_distance, non_dominated
from paretomerge.suites import FAST_TASKS, TinyResNetSuite, TinySuite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_map_grid import lattice  # noqa: E402  (the grid of task-wise coefficients, at any K)

TARGETS = r"layer[34]\.\d+\.conv\d\.weight$"
BETA_DIV = inspect.signature(ParetoMerging).parameters["beta_div"].default  # ours' diversity term, AdaMerging's too


def map_against_grid(tv, data: dict, per_dim: int, seed: int) -> dict:
    evaluator = MergeEvaluator(tv, {t: data[t] for t in tv.task_names})
    grid = evaluator(lattice(per_dim, tv.num_tasks))
    truth = grid[non_dominated(grid)]
    result = plain_map(evaluator, None, seed=seed)
    picks = np.unique(np.linspace(0, len(result.front_c) - 1, min(10, len(result.front_c))).round().astype(int))
    real = evaluator(result.front_c[picks])
    return {"grid": len(grid), "evaluations": result.evaluations,
            "gd_predicted": generational_distance(result.front_predicted, truth),
            "igd_predicted": inverted_generational_distance(result.front_predicted, truth),
            "gd_real": generational_distance(real, truth), "igd_real": inverted_generational_distance(real, truth),
            "front_mean": float(100 * real.mean(1).mean()), "grid_best_mean": float(100 * grid.mean(1).max())}


def fit(model, suite, steps: int, root: Path) -> None:
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              default_root_dir=str(root)).fit(model, datamodule=suite)


def extra_seconds(suite_of, rounds: int = 5) -> dict:
    """Medians over alternating rounds: one at() and one MAP evaluation under recomputed, minus under merged."""
    times: dict = {p: {"at": [], "map": []} for p in ("merged", "recomputed")}
    model = {p: AdaMerging(task_vectors=suite_of(p).task_vectors()) for p in times}
    evaluator = {p: MergeEvaluator(suite_of(p).task_vectors(), suite_of(p).labeled("val")) for p in times}
    c = np.full((1, len(FAST_TASKS)), 0.3)
    for _ in range(rounds):
        for p in times:
            start = time.perf_counter()
            model[p].at()
            times[p]["at"].append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluator[p](c)
            times[p]["map"].append(time.perf_counter() - start)
    return {k: float(np.median(times["recomputed"][k]) - np.median(times["merged"][k])) for k in ("at", "map")} | {
        f"{k}_merged": float(np.median(times["merged"][k])) for k in ("at", "map")}


def run_resnet(seed: int, policy: str, steps: int, root: Path, grids: tuple[int, int]) -> dict:
    suite = TinyResNetSuite(seed=seed, buffer_policy=policy, progress=False)
    tv = suite.task_vectors()
    val = suite.labeled("val")
    row: dict = {"model": "ResNet", "seed": seed, "policy": policy}
    row["individual"] = float(100 * individual_scores(tv, suite).mean())
    row["task_arithmetic"] = float(100 * static_point("task_arithmetic", tv, suite).mean())
    row["ties"] = float(100 * static_point("ties", tv, suite).mean())
    row["map3"] = map_against_grid(tv, val, grids[1], seed)
    row["map2"] = map_against_grid(tv.subset(list(tv.task_names[:2])), val, grids[0], seed)
    torch.manual_seed(seed)
    ada = AdaMerging(beta_div=BETA_DIV)  # like for like: ours' diversity term
    fit(ada, suite, steps, root / f"ada{seed}{policy}")
    row["adamerging"] = float(100 * np.mean(list(suite.evaluate(ada.at()).values())))
    ours = ParetoMerging(targets=TARGETS, seed=seed)
    fit(ours, suite, steps, root / f"ours{seed}{policy}")
    preferences = summary_preferences(tv.num_tasks)
    front = evaluate_front(ours, suite, preferences, progress=False).numpy()
    free = static_front("task_arithmetic_preference", tv, suite, preferences).numpy()
    row["ours_equal"] = float(100 * front[0].mean())
    row["ours_hv"], row["free_hv"] = hypervolume(front), hypervolume(free)
    return row


def run_vit(seed: int, grids: tuple[int, int]) -> dict:
    suite = TinySuite(tasks=list(FAST_TASKS), seed=seed, unseen_tasks=None, progress=False)
    tv, val = suite.task_vectors(), suite.labeled("val")
    return {"model": "ViT", "seed": seed, "policy": "-", "map3": map_against_grid(tv, val, grids[1], seed),
            "map2": map_against_grid(tv.subset(list(tv.task_names[:2])), val, grids[0], seed)}


def tables(rows: list[dict]) -> str:
    resnet = [r for r in rows if r["model"] == "ResNet"]
    lines = ["| policy | seed | individual | Task Arithmetic | TIES | MAP front (K=3, real, val) | AdaMerging | "
             "ours equal | ours HV | TA+pref HV |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in resnet:
        lines.append(f"| {r['policy']} | {r['seed']} | {r['individual']:.1f} | {r['task_arithmetic']:.1f} | "
                     f"{r['ties']:.1f} | {r['map3']['front_mean']:.1f} | {r['adamerging']:.1f} | "
                     f"{r['ours_equal']:.1f} | {r['ours_hv']:.4f} | {r['free_hv']:.4f} |")
    lines.append("")
    lines.append("| policy | mean over seeds: individual | Task Arithmetic | TIES | MAP front | AdaMerging | "
                 "ours equal | ours HV | TA+pref HV |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for policy in dict.fromkeys(r["policy"] for r in resnet):
        part = [r for r in resnet if r["policy"] == policy]
        mean = {k: np.mean([r[k] for r in part]) for k in ("individual", "task_arithmetic", "ties", "adamerging",
                                                            "ours_equal", "ours_hv", "free_hv")}
        front = np.mean([r["map3"]["front_mean"] for r in part])
        lines.append(f"| {policy} | {mean['individual']:.1f} | {mean['task_arithmetic']:.1f} | {mean['ties']:.1f} | "
                     f"{front:.1f} | {mean['adamerging']:.1f} | {mean['ours_equal']:.1f} | {mean['ours_hv']:.4f} | "
                     f"{mean['free_hv']:.4f} |")
    lines += ["", "| model | policy | seed | K | grid points | MAP evaluations | GD predicted | IGD predicted | "
              "GD real | IGD real |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for k in (2, 3):
            m = r[f"map{k}"]
            lines.append(f"| {r['model']} | {r['policy']} | {r['seed']} | {k} | {m['grid']} | {m['evaluations']} | "
                         f"{m['gd_predicted']:.4f} | {m['igd_predicted']:.4f} | {m['gd_real']:.4f} | "
                         f"{m['igd_real']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=list(BUFFER_POLICIES), choices=BUFFER_POLICIES)
    parser.add_argument("--steps", type=int, default=200, help="AdaMerging's and ours' training steps")
    parser.add_argument("--grids", type=int, nargs=2, default=[15, 7], help="grid points per dimension at K=2, 3")
    parser.add_argument("--no-vit", action="store_true", help="skip the TinySuite ViT's MAP rows")
    parser.add_argument("--out", default="benchmarks/out/resnet_buffers.json")
    args = parser.parse_args(argv)
    root = Path("benchmarks/out/resnet_buffers")
    rows = []
    for seed in args.seeds:
        for policy in args.policies:
            rows.append(run_resnet(seed, policy, args.steps, root, tuple(args.grids)))
            print(json.dumps(rows[-1]), flush=True)
    for seed in [] if args.no_vit else args.seeds:
        rows.append(run_vit(seed, tuple(args.grids)))
        print(json.dumps(rows[-1]), flush=True)
    seconds = extra_seconds(lambda p: TinyResNetSuite(seed=args.seeds[0], buffer_policy=p, progress=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
    print(f"\nResNets and BatchNorm: TinyResNetSuite ({', '.join(FAST_TASKS)}), test accuracy (%), "
          f"{args.steps} steps\n")
    print(tables(rows))
    print(f"\nrecomputed adds {seconds['at']:.3f} s to one at() (merged: {seconds['at_merged']:.3f} s) and "
          f"{seconds['map']:.3f} s to one MAP evaluation (merged: {seconds['map_merged']:.3f} s); medians of 5 "
          "alternating rounds")
    return rows


if __name__ == "__main__":
    main()
