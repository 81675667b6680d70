"""What each part of Pareto Merging buys, and does a preference move its task? The ablation grid (coefficients c(γ),
preference tensor Δ(γ), diversity term, each on or off; "paper" is SPEC §3 exactly, "ours" the class defaults, plus
ours without each issue-26 change) fitted on a TinySuite, evaluated at the equal preference and at every one-hot
(test split), beside layer-wise AdaMerging with the same steps, as published (β_div 0) and with ours' diversity term
(the like-for-like comparison).

For each variant and seed it prints: the mean accuracy at the equal preference; for how many tasks at(e_k) raises task
k over the equal preference, and the mean rise; how task k's own prediction entropy and accuracy move from the equal
preference to e_k (does lowering entropy track raising accuracy in the space the preference moves?); the worst task's
accuracy minus its zero-shot accuracy at the equal preference, and over all evaluated preferences; and the worst
collapse (the share of the most predicted class over the true majority-class share, at any evaluated preference and
task).

    python benchmarks/preference_response.py                                   # default suite, seed 0, every variant
    python benchmarks/preference_response.py --seeds 0 1 2                     # the table in benchmarks/README.md
    python benchmarks/preference_response.py --tasks shape digit --variants ours paper
    python benchmarks/preference_response.py --variants ours --set mu=0.05 rank=4   # a knob on top
    python benchmarks/preference_response.py --variants --ada-beta-div 0.8     # AdaMerging alone, another β_div

Every fit runs alone on the CPU (2 cores here): do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from paretomerge import AdaMerging, ParetoMerging, select_for_unseen_task, static_model
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
from paretomerge.objectives import entropy
from paretomerge.preferences import equal_and_one_hots
from paretomerge.suites import TinySuite

PAPER = PAPER_CONFIGURATION  # SPEC §3 exactly (configs/pareto_merging_paper.yaml)
DIV = inspect.signature(ParetoMerging).parameters["beta_div"].default  # ours' diversity term
NO_TENSOR = {"targets": None}
#: The ablation grid: coefficients (c(γ), SPEC §3b) × preference tensor Δ(γ) × diversity term, each on or off.
#: "paper" is coefficients off, tensor on, diversity off; "ours" is the class defaults (all three on).
VARIANTS = {  # name -> ParetoMerging options on top of the class defaults
    "λ only": {**PAPER, **NO_TENSOR},
    "λ only + div": {**PAPER, **NO_TENSOR, "beta_div": DIV},
    "paper": PAPER,
    "paper + div": {**PAPER, "beta_div": DIV},
    "coefficients": {"beta_div": 0.0, **NO_TENSOR},
    "coefficients + div": NO_TENSOR,
    "coefficients + tensor": {"beta_div": 0.0},
    "ours": {},  # coefficients + tensor + div: the class defaults
    "ours, ω from 0": {"omega_init": 0.0},  # what starting c(γ) at Task Arithmetic + preference buys
    "ours, α 1": {"alpha": 1.0},  # what Dir(0.5) training preferences buy
    "ours before issue 26 (ω from 0, α 1)": {"omega_init": 0.0, "alpha": 1.0},
}


def fit(model: L.LightningModule, suite: TinySuite, steps: int) -> float:
    start = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              num_sanity_val_steps=0).fit(model, datamodule=suite)
    return time.perf_counter() - start


@torch.no_grad()
def measure(net: torch.nn.Module, data: dict) -> dict[str, np.ndarray]:
    """Per task: test accuracy, mean prediction entropy, and the collapse ratio."""
    acc, ent, collapse = [], [], []
    for task, (images, labels) in data.items():
        logits = net(images, task=task)
        predicted = logits.argmax(-1)
        classes = logits.shape[-1]
        acc.append(float((predicted == labels).float().mean()))
        ent.append(float(entropy(logits)))
        share = torch.bincount(predicted, minlength=classes).max() / len(labels)
        majority = torch.bincount(labels, minlength=classes).max() / len(labels)
        collapse.append(float(share / majority))
    return {"acc": np.array(acc), "entropy": np.array(ent), "collapse": np.array(collapse)}


@torch.no_grad()
def unseen_tasks(model: ParetoMerging, suite: TinySuite) -> dict[str, dict[str, float]]:
    """Paper §4.3 on each unseen task: the accuracy of the preference `select_for_unseen_task` picks (lowest entropy
    on the task's unlabeled test images), of the equal preference, of zero-shot θ0 and Task Arithmetic with the
    task's head, and of the best of the same 30 candidates (the oracle, which needs labels)."""
    out = {}
    tv = suite.task_vectors()
    for task in suite.unseen_tasks:
        data = suite.unseen(task)

        def accuracy(net: torch.nn.Module, task: str = task, data=data) -> float:
            net.heads[task] = data.head
            return float((net(data.images, task=task).argmax(-1) == data.labels).float().mean())

        chosen = select_for_unseen_task(model, data.images, data.head, task=task, progress=False)
        candidates = [accuracy(model.at(p)) for p in chosen.preferences]
        out[task] = {
            "selected": accuracy(chosen.model),
            "equal": accuracy(model.at(torch.full((len(suite.tasks),), 1.0 / len(suite.tasks)))),
            "zero-shot": suite.build_report["unseen_tasks"][task]["zero_shot_accuracy"],
            "Task Arithmetic": accuracy(static_model("task_arithmetic", tv)),
            "oracle (best of 30)": max(candidates),
            "candidates, median": float(np.median(candidates)),
        }
    return out


def run(suite: TinySuite, options: dict, steps: int) -> dict:
    model = ParetoMerging(**options)
    seconds = fit(model, suite, steps)
    data = suite.labeled("test")
    rows = [measure(model.at(p), data) for p in equal_and_one_hots(len(suite.tasks))]
    acc = np.stack([r["acc"] for r in rows])  # [1 + K, K]
    ent = np.stack([r["entropy"] for r in rows])
    k = np.arange(len(suite.tasks))
    return {"acc": acc.tolist(), "entropy": ent.tolist(), "collapse": max(r["collapse"].max() for r in rows),
            "own_acc": acc[1 + k, k].tolist(), "own_entropy": ent[1 + k, k].tolist(), "seconds": seconds,
            "unseen": unseen_tasks(model, suite)}


def summarise(result: dict, zero_shot: np.ndarray) -> dict:
    acc, ent = np.array(result["acc"]), np.array(result["entropy"])
    rise = np.array(result["own_acc"]) - acc[0]
    return {
        "equal": 100 * acc[0].mean(),
        "wins": int((rise > 0).sum()),
        "rise": 100 * rise.mean(),
        "d_entropy": float((np.array(result["own_entropy"]) - ent[0]).mean()),
        "equal_vs_zs": 100 * float((acc[0] - zero_shot).min()),
        "worst_vs_zs": 100 * float((acc - zero_shot).min()),
        "collapse": result["collapse"],
        "per_task_rise": (100 * rise).round(1).tolist(),
        "per_task_d_entropy": (np.array(result["own_entropy"]) - ent[0]).round(3).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="TinySuite tasks (default: all eight)")
    parser.add_argument("--recipe", default=None, help="JSON overrides of the suite's Recipe")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ParetoMerging options applied on top of every variant (values parsed as JSON)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-ada", action="store_true", help="skip the AdaMerging reference")
    parser.add_argument("--ada-beta-div", type=float, nargs="+", default=[0.0, DIV],
                        help="the AdaMerging reference's diversity terms (default: none, as published, and ours')")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    args = parser.parse_args()
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    lines = ["| seed | variant | equal | one-hot wins | mean rise | own Δentropy (nats) | equal − ZS, worst task "
             "| worst acc − ZS | collapse | fit s | rise per task |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    unseen_rows: list[str] = []
    for seed in args.seeds:
        kwargs = {"seed": seed, "batch_size": args.batch_size, "cache_dir": args.cache_dir}
        if args.tasks:
            kwargs["tasks"] = args.tasks
        if args.recipe:
            kwargs["recipe"] = json.loads(args.recipe)
        suite = TinySuite(**kwargs)
        suite.prepare_data()
        report = suite.build_report
        zero_shot = np.array([report["tasks"][t]["zero_shot_accuracy"] for t in suite.tasks])
        for beta_div in () if args.no_ada else args.ada_beta_div:
            ada = AdaMerging(beta_div=beta_div)
            seconds = fit(ada, suite, args.steps)
            accuracy = np.array([suite.evaluate(ada.at())[t] for t in suite.tasks])
            lines.append(f"| {seed} | AdaMerging (layer-wise, β_div {beta_div:g}) | {100 * accuracy.mean():.1f} "
                         f"| | | | {100 * (accuracy - zero_shot).min():+.1f} | | | {seconds:.0f} | |")
            print(lines[-1], flush=True)
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(json.dumps({"seed": seed, "tasks": list(suite.tasks), "variant": "AdaMerging",
                                             "beta_div": beta_div, "steps": args.steps, "acc": accuracy.tolist(),
                                             "equal": 100 * accuracy.mean()}) + "\n")
        for name in args.variants:
            options = {**VARIANTS[name], **extra, "seed": seed}
            result = run(suite, options, args.steps)
            s = summarise(result, zero_shot)
            label = name + (f" ({', '.join(args.set)})" if args.set else "")
            lines.append(f"| {seed} | {label} | {s['equal']:.1f} | {s['wins']}/{len(suite.tasks)} | {s['rise']:+.1f} | "
                         f"{s['d_entropy']:+.3f} | {s['equal_vs_zs']:+.1f} | {s['worst_vs_zs']:+.1f} | "
                         f"{s['collapse']:.2f} | "
                         f"{result['seconds']:.0f} | {' '.join(f'{x:+.1f}' for x in s['per_task_rise'])} |")
            print(lines[-1], flush=True)
            for task, values in result["unseen"].items():
                cells = " | ".join(f"{100 * v:.1f}" for v in values.values())
                unseen_rows.append(f"| {seed} | {label} | {task} | {cells} |")
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.write(json.dumps({"seed": seed, "tasks": list(suite.tasks), "variant": label,
                                             "options": options, "steps": args.steps, **result, **s}) + "\n")
    print("\n".join(["", *lines]))
    if unseen_rows:
        print("\nUnseen tasks (paper §4.3), test accuracy %:\n")
        header = ("| seed | variant | task | selected | equal | zero-shot | Task Arithmetic | oracle (best of 30) "
                  "| candidates, median |")
        print("\n".join([header, "|---|---|---|---|---|---|---|---|---|", *unseen_rows]))


if __name__ == "__main__":
    main()
