"""MAP on the TinySuite (SPEC §6), in the shapes of the MAP paper's tables. Every real evaluation goes through
`MergeEvaluator` (``kernels.merge`` + the kernels' forward) on the default suite's labeled validation split;
subsets of tasks are `TaskVectors.subset` of the 8-task suite.

    python benchmarks/bench_map.py                 # all tables
    python benchmarks/bench_map.py --tables 1 5    # some of them

1. For K = 2, 3, 4: MAP's evaluations, held-out R², and the win rate of MAP's (re-evaluated) front against a
   grid search given 4–6× more evaluations.
2. K = 2: IGD to a dense-grid ground truth against the number of evaluations, MAP (predicted and real) and grid.
3. K = 2: Bayesian MAP against plain MAP at equal budgets (IGD to the dense grid).
4. The evaluation kernel: seconds per evaluated c, several models per call (vmap) against one at a time.
6. K = 4: nested MAP against plain MAP at the same number of evaluations, preference-weighted real accuracy.
5. Pareto Merging against MAP on the 8-task suite, on the same preferences: hypervolume of the SPEC §4 front and
   the preference-weighted test accuracy over 20 Dirichlet preferences, with each method's cost.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `callbacks` lives at the repository root

from paretomerge.map.bayesian import bayesian_map
from paretomerge.map.evaluate import MergeEvaluator
from paretomerge.map.plain import plain_map
from paretomerge.map.sampling import DEFAULT_BUDGETS
from paretomerge.map.search import nsga3_front
from paretomerge.pareto import inverted_generational_distance, non_dominated, win_rate
from paretomerge.suites import TinySuite

SUBSETS = {2: ["digit", "position"], 3: ["shape", "digit", "count"], 4: ["shape", "digit", "count", "colour"]}


def grid(num_tasks: int, per_dim: int) -> np.ndarray:
    axis = np.linspace(0.0, 1.0, per_dim)
    return np.array(list(itertools.product(axis, repeat=num_tasks)))


def evaluator_for(suite: TinySuite, tasks: list[str], **options) -> MergeEvaluator:
    data = suite.labeled("val")
    return MergeEvaluator(suite.task_vectors().subset(tasks), {t: data[t] for t in tasks}, **options)


def front_of(values: np.ndarray) -> np.ndarray:
    return values[non_dominated(values)]


def table_1(suite: TinySuite) -> None:
    print("### 1. MAP against grid search (validation accuracy; win rate of MAP's real front)\n")
    print("| K | tasks | MAP evaluations | mean held-out R² | grid evaluations | ratio | win rate MAP vs grid "
          "| win rate grid vs MAP | MAP s | grid s |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, tasks in SUBSETS.items():
        evaluator = evaluator_for(suite, tasks)
        start = time.perf_counter()
        result = plain_map(evaluator)
        real = evaluator(result.front_c)
        map_seconds = time.perf_counter() - start
        per_dim = int(round((6 * DEFAULT_BUDGETS[k]) ** (1 / k)))
        start = time.perf_counter()
        grid_values = evaluator_for(suite, tasks)(grid(k, per_dim))
        grid_seconds = time.perf_counter() - start
        grid_evaluations = per_dim ** k * k
        print(f"| {k} | {', '.join(tasks)} | {result.evaluations} | {np.nanmean(result.r2):.3f} | {grid_evaluations} "
              f"| {grid_evaluations / result.evaluations:.1f} | {win_rate(front_of(real), front_of(grid_values)):.3f} "
              f"| {win_rate(front_of(grid_values), front_of(real)):.3f} | {map_seconds:.0f} | {grid_seconds:.0f} |",
              flush=True)


def table_2_and_3(suite: TinySuite, tables: set[int]) -> None:
    tasks = SUBSETS[2]
    truth = front_of(evaluator_for(suite, tasks)(grid(2, 41)))
    if 2 in tables:
        print("\n### 2. K = 2: IGD to the dense-grid front (41 × 41 points) by evaluations spent\n")
        print("| method | points | evaluations | IGD predicted | IGD real |\n|---|---:|---:|---:|---:|")
        for budget in (8, 12, 16, 20, 30, 50):
            evaluator = evaluator_for(suite, tasks)
            result = plain_map(evaluator, budget=budget, holdout=0.0)
            real = evaluator(result.front_c)
            print(f"| MAP | {budget} | {result.evaluations} | "
                  f"{inverted_generational_distance(np.clip(result.front_predicted, 0, None), truth):.4f} | "
                  f"{inverted_generational_distance(real, truth):.4f} |", flush=True)
        for per_dim in (3, 4, 5, 7, 10, 14):
            values = evaluator_for(suite, tasks)(grid(2, per_dim))
            print(f"| grid | {per_dim}×{per_dim} | {per_dim ** 2 * 2} | — | "
                  f"{inverted_generational_distance(front_of(values), truth):.4f} |", flush=True)
    if 3 in tables:
        print("\n### 3. K = 2: Bayesian MAP against plain MAP at equal budgets (IGD of the real front)\n")
        print("| points | plain MAP | Bayesian MAP (6 + rounds × 3) |\n|---:|---:|---:|")
        for rounds in (1, 3, 5):
            budget = 6 + 3 * rounds
            plain_eval = evaluator_for(suite, tasks)
            plain = plain_map(plain_eval, budget=budget, holdout=0.0)
            bayes_eval = evaluator_for(suite, tasks)
            bayes = bayesian_map(bayes_eval, initial=6, per_round=3, rounds=rounds)
            bayes_c, _ = nsga3_front(bayes.surrogates)
            print(f"| {budget} | {inverted_generational_distance(plain_eval(plain.front_c), truth):.4f} | "
                  f"{inverted_generational_distance(bayes_eval(bayes_c), truth):.4f} |", flush=True)


def table_4(suite: TinySuite, rounds: int = 4) -> None:
    print("\n### 4. Evaluation kernel: seconds per evaluated c (8 tasks, 256 validation images each)\n")
    c = np.random.default_rng(0).uniform(0, 1, (8, 8))
    evaluators = {m: evaluator_for(suite, list(suite.tasks), models_per_call=m) for m in (1, 8)}
    times: dict[int, list[float]] = {1: [], 8: []}
    for r in range(rounds):
        for m in ((1, 8) if r % 2 == 0 else (8, 1)):
            start = time.perf_counter()
            evaluators[m](c)
            times[m].append((time.perf_counter() - start) / len(c))
    one, many = np.median(times[1]), np.median(times[8])
    print("| models per call | median s per c |\n|---:|---:|")
    print(f"| 1 | {one:.3f} |\n| 8 | {many:.3f} |\n\nratio 8-per-call / one-at-a-time: {many / one:.2f} "
          f"(median of {rounds} alternating rounds)")


def table_5(suite: TinySuite, steps: int = 500) -> None:
    import lightning as L

    from paretomerge import ParetoMerging
    from paretomerge.front import evaluate_front
    from paretomerge.kernels import materialize
    from paretomerge.map.search import choose_for_preference
    from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
    from paretomerge.pareto import hypervolume, preference_weighted_sum
    from paretomerge.preferences import dirichlet_set, front_preferences
    from paretomerge.static import task_wise

    tasks = list(suite.tasks)
    models, pm_seconds = {}, {}
    for label, options in (("ours", {}), ("paper", PAPER_CONFIGURATION)):
        L.seed_everything(0, verbose=False)
        models[label] = ParetoMerging(**options)
        trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, deterministic=True)
        start = time.perf_counter()
        trainer.fit(models[label], datamodule=suite)
        pm_seconds[label] = time.perf_counter() - start
    evaluator = evaluator_for(suite, tasks)
    start = time.perf_counter()
    result = plain_map(evaluator)
    map_seconds = time.perf_counter() - start
    tv = suite.task_vectors()

    def map_model(p):
        c, _ = choose_for_preference(result.front_c, result.front_predicted, p.numpy())
        return materialize(tv, task_wise(tv, c))

    def accuracy(net):
        values = suite.evaluate(net)
        return [values[t] for t in tasks]

    rows = []
    for name, prefs in (("front (SPEC §4, 30 preferences)", front_preferences(len(tasks))),
                        ("20 Dirichlet preferences", dirichlet_set(len(tasks), 20, seed=0))):
        fronts = {label: evaluate_front(m, suite, prefs, progress=False).numpy() for label, m in models.items()}
        fronts["MAP"] = np.array([accuracy(map_model(p)) for p in prefs])
        for label, acc in fronts.items():
            ws = preference_weighted_sum(acc, prefs)
            rows.append(f"| {name} | {label} | {hypervolume(acc):.4f} | {100 * ws.mean():.1f} ± {100 * ws.std():.1f} |")
    print("\n### 5. Pareto Merging (ours and the paper's) against MAP, 8 tasks, test accuracy on the same "
          "preferences\n")
    print("| preferences | method | HV | Σ p_k acc_k (%) |\n|---|---|---:|---:|")
    print("\n".join(rows))
    print(f"\nCost: Pareto Merging {steps} training steps, {pm_seconds['ours']:.0f} s (ours), "
          f"{pm_seconds['paper']:.0f} s (paper); MAP {result.evaluations} evaluations (validation split), "
          f"{map_seconds:.0f} s; mean held-out R² {np.nanmean(result.r2):.3f}.")


def table_6(suite: TinySuite, points_per_pair: int = 20) -> None:
    from paretomerge.map.nested import nested_map
    from paretomerge.map.search import choose_for_preference
    from paretomerge.preferences import dirichlet_set

    tasks = SUBSETS[4]
    prefs = dirichlet_set(4, 5, seed=0).numpy()
    nested_scores, plain_scores, spent = [], [], []
    start = time.perf_counter()
    for p in prefs:
        evaluator = evaluator_for(suite, tasks)
        result = nested_map(evaluator, p, points_per_pair=points_per_pair)
        nested_scores.append(float(evaluator(result.coefficients)[0] @ p))
        spent.append(result.evaluations)
    nested_seconds = time.perf_counter() - start
    budget = int(np.mean(spent)) // 4  # points of plain MAP with the same evaluations (4 tasks each)
    evaluator = evaluator_for(suite, tasks)
    start = time.perf_counter()
    plain = plain_map(evaluator, budget=budget, holdout=0.0)
    for p in prefs:
        c, _ = choose_for_preference(plain.front_c, plain.front_predicted, p)
        plain_scores.append(float(evaluator(c)[0] @ p))
    plain_seconds = time.perf_counter() - start
    print("\n### 6. K = 4: nested MAP against plain MAP, 5 Dirichlet preferences (Σ p_k acc_k, validation, %)\n")
    print("| method | evaluations | mean ± std | s |\n|---|---:|---:|---:|")
    print(f"| nested MAP ({points_per_pair} points per pair) | {int(np.mean(spent))} per preference | "
          f"{100 * np.mean(nested_scores):.1f} ± {100 * np.std(nested_scores):.1f} | {nested_seconds:.0f} |")
    print(f"| plain MAP ({budget} points) | {plain.evaluations} for all preferences | "
          f"{100 * np.mean(plain_scores):.1f} ± {100 * np.std(plain_scores):.1f} | {plain_seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="*", type=int, default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--cache-dir", default=None, help="the TinySuite cache root (default: the suite's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    suite = TinySuite(progress=False, cache_dir=args.cache_dir)
    tables = set(args.tables)
    if 1 in tables:
        table_1(suite)
    if tables & {2, 3}:
        table_2_and_3(suite, tables)
    if 4 in tables:
        table_4(suite)
    if 5 in tables:
        table_5(suite)
    if 6 in tables:
        table_6(suite)


if __name__ == "__main__":
    main()
