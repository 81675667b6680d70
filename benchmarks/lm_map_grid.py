"""MAP on the loss metric at K = 2 (the MAP paper's Figure 6 and Table 7), on TinyLM pairs of languages: GD and IGD of
MAP's front against the front of a 200-point grid search.

For each pair and seed, on the validation text (next-token loss, nats per token, lower is better):

- the grid: a 14 × 14 lattice of task-wise coefficients c ∈ [0, 1]² (196 points; the paper's "200 scaling
  coefficients" are 14.14 per dimension), each merged model θ0 + c₁τ₁ + c₂τ₂ evaluated on both languages; its
  non-dominated points are the ground-truth front;
- MAP: the paper's budget for K = 2 (30 points: the two one-hots and 28 uniform ones), a quadratic surrogate per
  language in the loss's case (3: softplus(quadratic) + 0), NSGA-III minimising both; 10 of its front members are
  re-evaluated for real;
- GD (MAP's front to the grid's) and IGD (the grid's to MAP's), for the predicted and the real front, in nats per
  token; and the held-out R² of the surrogates.

    python benchmarks/lm_map_grid.py                       # the six pairs, seeds 0-2
    python benchmarks/lm_map_grid.py --pairs svo+sov vso+osv --seeds 0
    python benchmarks/lm_map_grid.py --quick               # the fast suite, one pair, a 5 × 5 grid: a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.map.plain import plain_map
from paretomerge.pareto import LOSS, generational_distance, inverted_generational_distance, non_dominated
from paretomerge.suites import FAST_LM_RECIPE, TinyLMSuite
from paretomerge.suites.tiny_lm_text import LANGUAGES

PAIRS = ["+".join(p) for p in itertools.combinations(LANGUAGES, 2)]


def lattice(per_dim: int, dims: int = 2) -> np.ndarray:
    """The task-wise coefficients of a ``per_dim``-point grid of [0, 1] per task: ``[per_dim ** dims, dims]``."""
    axis = np.linspace(0.0, 1.0, per_dim)
    return np.array(list(itertools.product(axis, repeat=dims)))


def run(pair: str, seed: int, per_dim: int, budget: int | None, options: dict) -> dict:
    tasks = pair.split("+")
    suite = TinyLMSuite(tasks=tasks, seed=seed, progress=False, **options)
    evaluator = MergeEvaluator(suite.task_vectors(), suite.labeled("val"))
    start = time.perf_counter()
    grid = evaluator(lattice(per_dim))
    truth = grid[non_dominated(grid, LOSS)]
    grid_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = plain_map(evaluator, budget, seed=seed)
    map_seconds = time.perf_counter() - start
    picks = np.unique(np.linspace(0, len(result.front_c) - 1, min(10, len(result.front_c))).round().astype(int))
    real = evaluator(result.front_c[picks])
    predicted = result.front_predicted
    return {"pair": pair, "seed": seed, "grid_points": len(grid), "grid_front": len(truth),
            "map_evaluations": result.evaluations, "r2": result.r2.tolist(),
            "gd_predicted": generational_distance(predicted, truth, LOSS),
            "igd_predicted": inverted_generational_distance(predicted, truth, LOSS),
            "gd_real": generational_distance(real, truth, LOSS),
            "igd_real": inverted_generational_distance(real, truth, LOSS),
            "loss_range": float(np.ptp(truth, axis=0).mean()), "grid_s": grid_seconds, "map_s": map_seconds}


def table(rows: list[dict]) -> str:
    lines = ["| pair | seed | grid points (front) | MAP (model, task) evaluations | R² | GD predicted | "
             "IGD predicted | GD real | IGD real | front's loss range | grid s | MAP s |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['seed']} | {r['grid_points']} ({r['grid_front']}) | {r['map_evaluations']} | "
                     + ", ".join(f"{v:.3f}" for v in r["r2"]) + f" | {r['gd_predicted']:.4f} | "
                     f"{r['igd_predicted']:.4f} | {r['gd_real']:.4f} | {r['igd_real']:.4f} | {r['loss_range']:.3f} | "
                     f"{r['grid_s']:.0f} | {r['map_s']:.0f} |")
    keys = ("gd_predicted", "igd_predicted", "gd_real", "igd_real")
    mean = {k: np.mean([r[k] for r in rows]) for k in keys}
    std = {k: np.std([r[k] for r in rows]) for k in keys}
    lines.append(f"\nMean ± std over {len(rows)} runs: " + ", ".join(f"{k} {mean[k]:.4f} ± {std[k]:.4f}" for k in keys)
                 + " (nats/token; the MAP paper's Table 7, Llama-3-8B pairs: GD 0.014-0.023, IGD 0.028-0.035)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-dim", type=int, default=14, help="grid points per dimension (14: 196 points)")
    parser.add_argument("--budget", type=int, default=None, help="MAP's evaluated points (default: the paper's, 30)")
    parser.add_argument("--quick", action="store_true", help="the fast suite, one pair, seed 0, a 5 × 5 grid")
    args = parser.parse_args(argv)
    options: dict = {}
    if args.quick:
        options = {"recipe": FAST_LM_RECIPE, "train_docs": 64, "val_docs": 32}
        args.pairs, args.seeds, args.per_dim = args.pairs[:1], [0], 5
    rows = [run(pair, seed, args.per_dim, args.budget, options) for seed in args.seeds for pair in args.pairs]
    print(f"\nMAP against a {args.per_dim} × {args.per_dim} grid on TinyLM pairs{' (fast)' if args.quick else ''}, "
          "next-token loss on the validation text\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
