"""Pareto Merging on language models (TinyLM): does ours beat the free front and the one-model baselines on the
next-token loss? Per seed, on the labeled test text (lower loss is better):

Ours is configs/tiny_lm.yaml's model (its init_args; ``--set key=value`` changes one), the paper's configuration the
same with `PAPER_CONFIGURATION` on top; both with the next-token loss, β_div 0.

1. the four languages, with the same 500 steps (batch 16 sequences per language) for every learned method:
   - the mean per-language loss at the equal preference of ours, of the paper's configuration, of layer-wise
     AdaMerging (Σ_k loss_k, one model) and of Task Arithmetic and TIES (no training);
   - each one-hot's own-language loss against the equal preference's (ours);
   - the hypervolume of ours' 30-preference front (FitSummary's set) and of Task Arithmetic + preference (θ0 +
     0.3·K·Σ_k γ_k τ_k) on the same preferences, of the gains over θ0's per-language test loss (the reference point);
2. the six pairs of languages: ours' 11-preference front against Task Arithmetic + preference, the same way.

    python benchmarks/lm_front_quality.py                      # seeds 0-2 and 3 (held out while choosing defaults)
    python benchmarks/lm_front_quality.py --seeds 0 --no-pairs
    python benchmarks/lm_front_quality.py --quick              # the fast suite, 10 steps, seed 0: a smoke test

Every fit runs alone on the CPU (2 cores here): do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from paretomerge import AdaMerging, ParetoMerging, static_model
from paretomerge.front import evaluate_front, static_front, summary_preferences
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
from paretomerge.pareto import LOSS, hypervolume, individual_gains
from paretomerge.suites import FAST_LM_RECIPE, TinyLMSuite

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's fit
from preference_response import fit  # noqa: E402

QUICK = {"recipe": FAST_LM_RECIPE, "train_docs": 256, "val_docs": 32}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_lm.yaml"


def ours_settings(overrides: dict) -> dict:
    """configs/tiny_lm.yaml's ParetoMerging init_args (seed aside: each case has its own), with ``overrides``."""
    settings = dict(yaml.safe_load(CONFIG.read_text())["model"]["init_args"])
    settings.pop("seed", None)
    return {**settings, **overrides}


def losses(suite: TinyLMSuite, net: torch.nn.Module) -> np.ndarray:
    scores = suite.evaluate(net)
    return np.array([scores[t] for t in suite.tasks])


def volumes(front: torch.Tensor, reference: np.ndarray, individual: np.ndarray) -> tuple[float, float]:
    """The hypervolume of the gains over θ0's loss, and normalised by the individual models' gains."""
    return (hypervolume(front, score=LOSS, reference=reference),
            hypervolume(front, individual_gains(individual, LOSS, reference), LOSS, reference))


def four_languages(seed: int, steps: int, options: dict, ours: dict) -> dict:
    suite = TinyLMSuite(seed=seed, progress=False, **options)
    tv, report = suite.task_vectors(), suite.build_report
    reference = np.array([report["tasks"][t]["zero_shot_loss"] for t in suite.tasks])
    individual = np.array([report["tasks"][t]["individual_loss"] for t in suite.tasks])
    preferences = summary_preferences(len(suite.tasks), 0)
    out = {"seed": seed, "tasks": list(suite.tasks), "reference": reference.tolist(),
           "individual": individual.tolist(), "equal": {}, "seconds": {}}
    out["equal"]["task arithmetic"] = losses(suite, static_model("task_arithmetic", tv)).tolist()
    out["equal"]["TIES"] = losses(suite, static_model("ties", tv)).tolist()
    ada = AdaMerging(objective="loss")
    out["seconds"]["AdaMerging"] = fit(ada, suite, steps)
    out["equal"]["AdaMerging"] = losses(suite, ada.at()).tolist()
    fronts = {"TA + preference": static_front("task_arithmetic_preference", tv, suite, preferences)}
    for name, settings in (("ours", ours), ("paper", {**ours, **PAPER_CONFIGURATION})):
        model = ParetoMerging(seed=seed, **{**settings, "objective": "loss", "beta_div": 0.0})
        out["seconds"][name] = fit(model, suite, steps)
        fronts[name] = evaluate_front(model, suite, preferences, progress=False)
        out["equal"][name] = fronts[name][0].tolist()
    k = len(suite.tasks)
    ours = fronts["ours"].numpy()
    out["one_hot_own"] = [float(ours[1 + i, i]) for i in range(k)]
    out["hv"] = {name: volumes(front, reference, individual) for name, front in fronts.items()}
    return out


def pairs(seed: int, steps: int, options: dict, ours: dict, limit: int | None = None) -> list[dict]:
    rows = []
    languages = TinyLMSuite(seed=seed, progress=False, **options).tasks
    for pair in list(itertools.combinations(languages, 2))[:limit]:
        suite = TinyLMSuite(tasks=list(pair), seed=seed, progress=False, **options)
        report = suite.build_report
        reference = np.array([report["tasks"][t]["zero_shot_loss"] for t in pair])
        individual = np.array([report["tasks"][t]["individual_loss"] for t in pair])
        preferences = summary_preferences(2, 0)
        model = ParetoMerging(seed=seed, **{**ours, "objective": "loss", "beta_div": 0.0})
        seconds = fit(model, suite, steps)
        front = evaluate_front(model, suite, preferences, progress=False)
        free = static_front("task_arithmetic_preference", suite.task_vectors(), suite, preferences)
        rows.append({"seed": seed, "pair": "+".join(pair), "seconds": seconds,
                     "hv_ours": volumes(front, reference, individual), "hv_free": volumes(free, reference, individual)})
    return rows


def report(main: list[dict], pair_rows: list[dict]) -> str:
    methods = ["task arithmetic", "TIES", "AdaMerging", "paper", "ours"]
    lines = ["### Four languages: mean test loss at the equal preference (nats/token; perplexity in brackets)\n",
             "| seed | θ0 | individual | " + " | ".join(methods) + " | ours − TA | ours − AdaMerging |",
             "|---:|---:|---:|" + "---:|" * (len(methods) + 2)]
    for r in main:
        mean = {m: float(np.mean(r["equal"][m])) for m in methods}
        cells = [f"{mean[m]:.4f} ({np.exp(mean[m]):.2f})" for m in methods]
        lines.append(f"| {r['seed']} | {np.mean(r['reference']):.4f} | {np.mean(r['individual']):.4f} | "
                     + " | ".join(cells) + f" | {mean['ours'] - mean['task arithmetic']:+.4f} | "
                     f"{mean['ours'] - mean['AdaMerging']:+.4f} |")
    lines += ["\n### Four languages: ours' one-hots and front\n",
              "| seed | one-hot own loss − equal, per language | one-hots lower than equal | HV ours | HV paper | "
              "HV TA + preference | normalised: ours / paper / TA + preference |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for r in main:
        shift = np.array(r["one_hot_own"]) - np.array(r["equal"]["ours"])
        hv = r["hv"]
        lines.append(f"| {r['seed']} | " + ", ".join(f"{t} {d:+.3f}" for t, d in zip(r["tasks"], shift, strict=True))
                     + f" | {int((shift < 0).sum())}/{len(shift)} | {hv['ours'][0]:.5f} | {hv['paper'][0]:.5f} | "
                     f"{hv['TA + preference'][0]:.5f} | {hv['ours'][1]:.4f} / {hv['paper'][1]:.4f} / "
                     f"{hv['TA + preference'][1]:.4f} |")
    if pair_rows:
        lines += ["\n### Pairs: hypervolume of ours' 11-preference front and of Task Arithmetic + preference\n",
                  "| seed | pair | HV ours | HV TA + preference | normalised ours / TA + preference | ours wins |",
                  "|---:|---|---:|---:|---|---|"]
        for r in pair_rows:
            lines.append(f"| {r['seed']} | {r['pair']} | {r['hv_ours'][0]:.5f} | {r['hv_free'][0]:.5f} | "
                         f"{r['hv_ours'][1]:.4f} / {r['hv_free'][1]:.4f} | "
                         f"{'yes' if r['hv_ours'][0] > r['hv_free'][0] else 'no'} |")
    lines.append("\n### The issue's checks, per seed\n")
    for r in main:
        mean = {m: float(np.mean(r["equal"][m])) for m in methods}
        shift = np.array(r["one_hot_own"]) - np.array(r["equal"]["ours"])
        won = [p for p in pair_rows if p["seed"] == r["seed"] and p["hv_ours"][0] > p["hv_free"][0]]
        total = [p for p in pair_rows if p["seed"] == r["seed"]]
        checks = {
            "ours at equal below TA": mean["ours"] < mean["task arithmetic"],
            "ours at equal below AdaMerging": mean["ours"] < mean["AdaMerging"],
            "every one-hot lowers its own loss": bool((shift < 0).all()),
            "four-language HV above TA + preference": r["hv"]["ours"][0] > r["hv"]["TA + preference"][0],
        }
        if total:
            checks[f"pairs above TA + preference in all but one of {len(total)}"] = len(won) >= len(total) - 1
        lines.append(f"seed {r['seed']}: " + "; ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in checks.items())
                     + (f" ({len(won)}/{len(total)} pairs)" if total else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-pairs", action="store_true", help="only the four-language suite")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ParetoMerging options for ours on top of configs/tiny_lm.yaml's (values parsed as JSON)")
    parser.add_argument("--out", help="append every result as a JSON line to this file")
    parser.add_argument("--quick", action="store_true", help="the fast suite, 10 steps, seed 0, one pair's worth")
    args = parser.parse_args(argv)
    options: dict = {"batch_size": args.batch_size}
    if args.quick:
        options.update(QUICK, batch_size=8)
        args.steps, args.seeds = 10, [0]
    ours = ours_settings({key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)})
    main_rows, pair_rows = [], []
    for seed in args.seeds:
        main_rows.append({**four_languages(seed, args.steps, options, ours), "ours": ours})
        rows = [] if args.no_pairs else pairs(seed, args.steps, options, ours, 1 if args.quick else None)
        pair_rows += rows
        for row in [main_rows[-1], *rows]:
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(f"\nTinyLM{' (fast)' if args.quick else ''}, {args.steps} steps, batch {options['batch_size']} sequences per "
          f"language, test text; ours: {ours}; the paper's configuration: the same with {PAPER_CONFIGURATION}\n")
    print(report(main_rows, pair_rows))
    return main_rows, pair_rows


if __name__ == "__main__":
    main()
