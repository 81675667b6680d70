"""Is the learned front worth a training run? Per case (a TinySuite task set and a seed): the hypervolume of ours,
of the paper's configuration and of Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k, free), and the winner.

Every method is evaluated on the labeled test split at the same preference set, the FitSummary's: the equal
preference and the one-hots, then the rest of SPEC §4's set (K = 2: 11 points in all; K = 3: Das–Dennis with 7
partitions, 36 points, plus the equal one, 37; K ≥ 4: Dirichlet(1) draws to 30, seed 0). Ours and the paper's
configuration train 500 steps (batch 16 per task, as configs/tiny.yaml) with the case's seed.

    python benchmarks/front_quality.py                           # the 12 small cases and the 8-task suite, seeds 0-2
    python benchmarks/front_quality.py --cases digit+position --seeds 0 --with-adamerging
    python benchmarks/front_quality.py --set alpha=1.0 --methods ours             # a knob on top of ours
    python benchmarks/front_quality.py --quick --with-adamerging   # the fast 3-task suite, 10 steps: a smoke test

``--with-adamerging`` adds AdaMerging + preference: one layer-wise AdaMerging run per preference, minimising
Σ_k γ_k f_k (SPEC §5), each evaluated at its own preference; by default twice, with ours' diversity term (β_div 0.1,
the like-for-like comparison) and without it (AdaMerging as published). ``--beta-div`` chooses the values.

Every fit runs alone on the CPU (2 cores here): do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's fit

from preference_response import fit  # noqa: E402

from paretomerge import AdaMerging, ParetoMerging  # noqa: E402
from paretomerge.front import evaluate_front, static_front, summary_preferences  # noqa: E402
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION  # noqa: E402
from paretomerge.pareto import hypervolume  # noqa: E402
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite  # noqa: E402

CASES = {
    "digit+position": ["digit", "position"],
    "shape+colour+digit": ["shape", "colour", "digit"],
    "shape+digit+count": ["shape", "digit", "count"],
    "position+stripes+size+count": ["position", "stripes", "size", "count"],
    "all 8": None,
}
QUICK_CASES = {"+".join(FAST_TASKS): list(FAST_TASKS)}  # the fast suite itself: a subset would build its own
QUICK_SUITE = {"recipe": FAST_RECIPE, "test_images": 128, "val_images": 64}
OURS_BETA_DIV = inspect.signature(ParetoMerging).parameters["beta_div"].default


def adamerging_front(suite: TinySuite, preferences: torch.Tensor, steps: int, beta_div: float) -> torch.Tensor:
    """``Acc [P, K]``: one AdaMerging + preference run per row, each evaluated at its own preference."""
    rows = []
    for p in preferences:
        model = AdaMerging(preference=p.tolist(), beta_div=beta_div)
        fit(model, suite, steps)
        accuracy = suite.evaluate(model.at())
        rows.append([accuracy[t] for t in suite.tasks])
    return torch.tensor(rows, dtype=torch.float64)


def run_case(case: str, tasks: list[str] | None, seed: int, methods: list[str], ours: dict, steps: int,
             with_adamerging: bool, beta_divs: list[float], suite_options: dict) -> dict:
    suite = TinySuite(seed=seed, progress=False, **({"tasks": tasks} if tasks else {}), **suite_options)
    tv = suite.task_vectors()
    preferences = summary_preferences(len(suite.tasks), 0)
    out = {"case": case, "seed": seed, "K": len(suite.tasks), "P": len(preferences), "ours_options": ours}
    fronts = {"TA + preference": static_front("task_arithmetic_preference", tv, suite, preferences)}
    for method in methods:
        model = ParetoMerging(seed=seed, **(ours if method == "ours" else PAPER_CONFIGURATION))
        out[f"{method}_s"] = fit(model, suite, steps)
        fronts[method] = evaluate_front(model, suite, preferences, progress=False)
    for beta_div in beta_divs if with_adamerging else ():
        fronts[ada_name(beta_div)] = adamerging_front(suite, preferences, steps, beta_div)
    out["hv"] = {name: hypervolume(front) for name, front in fronts.items()}
    out["equal"] = {name: 100 * float(front[0].mean()) for name, front in fronts.items()}
    out["winner"] = max(out["hv"], key=out["hv"].get)
    return out


def ada_name(beta_div: float) -> str:
    return f"AdaMerging + preference, β_div {beta_div:g}"


def table(results: list[dict], columns: list[str]) -> str:
    lines = ["| case | seed | K | P | " + " | ".join(f"HV {c}" for c in columns) + " | winner | ours − TA+pref |",
             "|---|---:|---:|---:|" + "---:|" * len(columns) + "---|---:|"]
    for r in results:
        cells = [f"{r['hv'][c]:.4f}" if c in r["hv"] else "–" for c in columns]
        gap = f"{r['hv']['ours'] - r['hv']['TA + preference']:+.4f}" if "ours" in r["hv"] else "–"
        lines.append(f"| {r['case']} | {r['seed']} | {r['K']} | {r['P']} | " + " | ".join(cells)
                     + f" | {r['winner']} | {gap} |")
    small = [r for r in results if r["K"] <= 4 and "ours" in r["hv"]]
    if small:
        wins = sum(r["hv"]["ours"] > r["hv"]["TA + preference"] for r in small)
        lines.append(f"\nOurs above Task Arithmetic + preference in {wins} of {len(small)} small-set cases.")
    paper = [r for r in results if "ours" in r["hv"] and "paper" in r["hv"]]
    if paper:
        wins = sum(r["hv"]["ours"] > r["hv"]["paper"] for r in paper)
        lines.append(f"Ours above the paper's configuration in {wins} of {len(paper)} cases.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, choices=[*CASES, *QUICK_CASES],
                        help="task sets (default: every one of CASES; with --quick, QUICK_CASES)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["ours", "paper"], choices=["ours", "paper"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ParetoMerging options for ours on top of its defaults (values parsed as JSON)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--with-adamerging", action="store_true", help="add AdaMerging + preference (P runs a case)")
    parser.add_argument("--beta-div", type=float, nargs="+", default=[OURS_BETA_DIV, 0.0],
                        help="AdaMerging + preference's diversity term, one front per value (default: ours' and none)")
    parser.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    parser.add_argument("--quick", action="store_true", help="the fast 3-task suite (colour, stripes, size), 10 steps, "
                        "seed 0: a smoke test of the script")
    args = parser.parse_args(argv)
    cases = {**CASES, **QUICK_CASES}
    suite_options: dict = {"batch_size": args.batch_size}
    if args.quick:
        suite_options.update(QUICK_SUITE, batch_size=8)
        args.steps, args.seeds = 10, [0]
    names = args.cases or list(QUICK_CASES if args.quick else CASES)
    ours = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    results = []
    for seed in args.seeds:
        for case in names:
            result = run_case(case, cases[case], seed, args.methods, ours, args.steps, args.with_adamerging,
                              args.beta_div, suite_options)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
    columns = [*args.methods, "TA + preference"]
    columns += [ada_name(b) for b in args.beta_div] if args.with_adamerging else []
    print(f"\nTinySuite{' (fast)' if args.quick else ''}, {args.steps} steps, batch {suite_options['batch_size']} per "
          f"task, test split; ours: {ours or 'the defaults'}\n")
    print(table(results, columns))
    return results


if __name__ == "__main__":
    main()
