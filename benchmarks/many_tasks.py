"""What K costs and what it does to the merge: the TinySuite's named 8-, 14- and 20-task sets (issue 33), per seed.

Per (task set, seed), each case in its own process (so that its peak memory is its own):
- the suite's build report on the labeled test split: zero-shot θ0, individual, Task Arithmetic (0.3), TIES;
- AdaMerging (layer-wise, 500 steps, ours' diversity term β_div 0.1: the like-for-like comparison);
- ours (configs/tiny.yaml's ParetoMerging) and the paper's configuration, 500 steps each, evaluated at the
  FitSummary's preference set (the equal preference, the K one-hots, then Dirichlet(1) draws to 30 in all: at K = 20
  that leaves 9 mixes);
- Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k, free) at the same preferences;
- the front metric of each (`pareto.measure_hypervolume`: exact up to 10 tasks, beyond that the Monte-Carlo
  approximation with its error), reference point 0;
- the cost: ours' training step against a plain step (a trainable copy of the backbone, Adam, the same batches:
  bench_step.py's pair, on this suite's models; alternating rounds, median ratio), the case's peak RSS, the `.ckpt`
  and export sizes (in models: θ0 + heads), the suite's build time and ours' fit time.

    python benchmarks/many_tasks.py                                  # tiny8, tiny14, tiny20 x seeds 0-2
    python benchmarks/many_tasks.py --sets tiny20 --seeds 0 --out results.jsonl
    python benchmarks/many_tasks.py --table results.jsonl             # the tables again, from saved results
    python benchmarks/many_tasks.py --quick                           # a smoke test: the fast suite, 5 steps
    python benchmarks/many_tasks.py --sets tiny14 tiny20 --mixed-tasks 8  # ours with ParetoMerging(mixed_tasks=8)

Every case runs alone on the CPU (2 cores here): do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts' helpers

from bench_compact import model_bytes, stored_sizes, trainer  # noqa: E402
from bench_step import make_steps  # noqa: E402

from paretomerge import AdaMerging, ParetoMerging  # noqa: E402
from paretomerge.front import evaluate_front, static_front, summary_preferences  # noqa: E402
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION  # noqa: E402
from paretomerge.pareto import measure_hypervolume  # noqa: E402
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite  # noqa: E402

SETS = ("tiny8", "tiny14", "tiny20")
QUICK = {"tasks": list(FAST_TASKS), "recipe": FAST_RECIPE, "test_images": 128, "val_images": 64}
BETA_DIV = 0.1  # ours' diversity term, given to AdaMerging too


def step_ratio(suite: TinySuite, seed: int, rounds: int) -> float:
    """Median over alternating rounds of (ours' step time / a plain step's), on the suite's task vectors and its
    training batches (bench_step.py's `make_steps`)."""
    tv = suite.task_vectors()
    steps, _ = make_steps(tv, argparse.Namespace(rank=16, seed=seed))
    batch = next(iter(suite.train_dataloader()))[0]
    images = {t: batch[t][0] for t in tv.task_names}
    gamma = torch.full((tv.num_tasks,), 1.0 / tv.num_tasks)
    ratios = []
    for r in range(rounds + 2):
        timed = {}
        for name in (("PM ours", "plain") if r % 2 == 0 else ("plain", "PM ours")):
            start = time.perf_counter()
            steps[name](images, gamma)
            timed[name] = time.perf_counter() - start
        if r >= 2:  # two warm-up rounds
            ratios.append(timed["PM ours"] / timed["plain"])
    return statistics.median(ratios)


def one_case(task_set: str, seed: int, steps: int, rounds: int, quick: bool, mixed_tasks: int | None = None) -> dict:
    options = dict(QUICK, batch_size=8) if quick else {"tasks": task_set}
    suite = TinySuite(seed=seed, progress=False, **options)
    start = time.perf_counter()
    tv = suite.task_vectors()
    report = suite.build_report
    num_tasks, tasks = tv.num_tasks, list(tv.task_names)
    out = {"set": "fast" if quick else task_set, "seed": seed, "K": num_tasks, "steps": steps,
           "mixed_tasks": mixed_tasks, "build_s": report["build_seconds"], "load_s": time.perf_counter() - start}
    rows = {"zero_shot": "zero_shot_accuracy", "individual": "individual_accuracy",
            "task_arithmetic": "task_arithmetic_accuracy", "ties": "ties_accuracy"}
    individual = np.array([report["tasks"][t]["individual_accuracy"] for t in tasks])
    per_task = {name: np.array([report["tasks"][t][key] for t in tasks]) for name, key in rows.items()}

    ada = AdaMerging(beta_div=BETA_DIV)
    trainer(steps).fit(ada, datamodule=suite)
    accuracy = suite.evaluate(ada.at())
    per_task["adamerging"] = np.array([accuracy[t] for t in tasks])

    preferences = summary_preferences(num_tasks, 0)
    out["P"] = len(preferences)
    fronts = {"TA + preference": static_front("task_arithmetic_preference", tv, suite, preferences).numpy()}
    for method, config in (("ours", {"mixed_tasks": mixed_tasks}), ("paper", PAPER_CONFIGURATION)):
        model = ParetoMerging(seed=seed, **config)
        fitted = trainer(steps)
        start = time.perf_counter()
        fitted.fit(model, datamodule=suite)
        out[f"{method}_fit_s"] = time.perf_counter() - start
        fronts[method] = evaluate_front(model, suite, preferences, progress=False).numpy()
        if method == "ours":
            ckpt, export = stored_sizes(fitted, model)
            out["ckpt_models"], out["export_models"] = ckpt / model_bytes(tv), export / model_bytes(tv)
    per_task["ours_equal"] = fronts["ours"][0]
    per_task["paper_equal"] = fronts["paper"][0]
    out["per_task"] = {name: dict(zip(tasks, values.tolist(), strict=True)) for name, values in per_task.items()}
    out["mean"] = {name: 100 * float(values.mean()) for name, values in per_task.items()}
    out["normalised"] = {name: 100 * float((values / individual).mean()) for name, values in per_task.items()}
    for name, front in fronts.items():
        own = front[1 + np.arange(num_tasks), np.arange(num_tasks)]
        volume = measure_hypervolume(front)
        out.setdefault("front", {})[name] = {
            "hv": volume.value, "hv_method": volume.method, "hv_error": volume.error,
            "one_hot_wins": int((own > front[0]).sum()), "one_hot_rise": 100 * float((own - front[0]).mean()),
            "one_hot_own": dict(zip(tasks, own.tolist(), strict=True))}
    out["step_ratio"] = step_ratio(suite, seed, rounds)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def volume(front: dict) -> str:
    text = f"{front['hv']:.4g}"
    return text + (f" ± {front['hv_error']:.2g}" if front["hv_method"] != "exact" else "")


def tables(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: (r.get("mixed_tasks") or 0, r["K"], r["seed"]))
    for r in results:  # ours trained with ParetoMerging(mixed_tasks=m): said in the set's cell
        if r.get("mixed_tasks") and "mixed" not in r["set"]:
            r["set"] += f" (mixed {r['mixed_tasks']})"
    lines = ["**Mean test accuracy (%)**, absolute / normalised by the individual models (each task's accuracy over "
             "its fine-tuned model's, averaged)", "",
             "| set | K | seed | zero-shot | individual | TA | TIES | AdaMerging (β_div 0.1) | paper, equal | "
             "ours, equal | ours − TA | ours − Ada |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m, n = r["mean"], r["normalised"]
        cells = [f"{m[c]:.1f} / {n[c]:.1f}" for c in ("zero_shot", "individual", "task_arithmetic", "ties",
                                                        "adamerging", "paper_equal", "ours_equal")]
        lines.append(f"| {r['set']} | {r['K']} | {r['seed']} | " + " | ".join(cells)
                     + f" | {m['ours_equal'] - m['task_arithmetic']:+.1f} | {m['ours_equal'] - m['adamerging']:+.1f} |")
    lines += ["", "**Fronts** (P preferences on the test split; hypervolume of accuracy, reference point 0: exact up "
              "to 10 tasks, beyond that the Monte-Carlo estimate ± 3 standard errors; one-hots: how many of the K "
              "raise "
              "their own task above the equal preference, and the mean rise in points)", "",
              "| set | K | seed | P | HV ours | HV paper | HV TA + pref | ours / TA+pref | one-hots ours | rise ours | "
              "one-hots paper | rise paper |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["front"]
        lines.append(f"| {r['set']} | {r['K']} | {r['seed']} | {r['P']} | {volume(f['ours'])} | {volume(f['paper'])} | "
                     f"{volume(f['TA + preference'])} | {f['ours']['hv'] / f['TA + preference']['hv']:.2f} | "
                     f"{f['ours']['one_hot_wins']}/{r['K']} | {f['ours']['one_hot_rise']:+.1f} | "
                     f"{f['paper']['one_hot_wins']}/{r['K']} | {f['paper']['one_hot_rise']:+.1f} |")
    lines += ["", "**Cost** (ours; step ratio: ours' training step / a plain step on the same batches, median of "
              "alternating rounds; sizes in models, θ0 + heads)", "",
              "| set | K | seed | step ratio | peak RSS MiB | .ckpt (models) | export (models) | build s "
              "| ours' fit s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['K']} | {r['seed']} | {r['step_ratio']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['ckpt_models']:.2f} | {r['export_models']:.2f} | {r['build_s']:.0f} | "
                     f"{r['ours_fit_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds of the step timing")
    parser.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    parser.add_argument("--table", default=None, metavar="JSONL", help="print the tables of saved results and stop")
    parser.add_argument("--quick", action="store_true", help="the fast 3-task suite, 5 steps, seed 0: a smoke test")
    parser.add_argument("--mixed-tasks", type=int, default=None, help="ours' ParetoMerging(mixed_tasks=...)")
    parser.add_argument("--one", nargs=2, metavar=("SET", "SEED"), help=argparse.SUPPRESS)  # a case, in-process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_case(args.one[0], int(args.one[1]), args.steps, args.rounds, args.quick,
                                  args.mixed_tasks)))
        return []
    if args.table:
        results = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(tables(results))
        return results
    if args.quick:
        args.sets, args.seeds, args.steps, args.rounds = ["tiny8"], [0], 5, 2
    results = []
    for seed in args.seeds:
        for task_set in args.sets:
            command = [sys.executable, __file__, "--one", task_set, str(seed), "--steps", str(args.steps),
                       "--rounds", str(args.rounds)] + (["--quick"] if args.quick else []) \
                + ([] if args.mixed_tasks is None else ["--mixed-tasks", str(args.mixed_tasks)])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{task_set} seed {seed} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
    print(f"\nTinySuite, {args.steps} steps, batch {8 if args.quick else 16} per task\n")
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
