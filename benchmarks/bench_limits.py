"""How close Pareto Merging runs to its physical floor (issue 8): the limit table, as ratios measured alternating in
one run, medians over rounds. Prints Markdown.

Rows 1-3 run for each configuration asked (``--configs``): the paper's (SPEC §3), ours with the full basis
(``basis_rank=None``) and ours with the default preference basis (`kernels.PreferenceBasis`). Rows 4-5: the paper's.

Rows (each with its target):
  1. PM step / plain step: one Pareto Merging training step (merge + Δ(γ) + forward + backward + Adam + λ clamp)
     against one ordinary training step of the same backbone (all weights trainable, Adam) on the same images, on
     the TinySuite (K=8, 16 images per task) and on open_clip ViT-B/32 (random weights, K=8 random task vectors,
     2 images per task).
  2. (merge + Δ) / PM step on ViT-B/32, K=8: the forward time of `kernels.merge` and `PreferenceTensor.delta`.
  3. Evaluating P preferences on the TinySuite's validation data (`front.evaluate_front`, what the front logger
     runs) against P plain evaluations of the unmerged backbone on the same prepared data.
  4. `at(γ)` / `copy.deepcopy(backbone)` on ViT-B/32 (the base θ0 + Σλτ already merged, as after the first call),
     in its own process.
  5. Peak RSS of a ViT-B/32 K=8 Pareto Merging `trainer.fit` (3 steps, 2 images per task), above the process's
     RSS after imports, against (K+3) × parameter bytes + activation bytes (median of ``--rounds`` fits, each in its
     own process). The activations are measured in their own process: the bytes autograd saves for backward in one
     plain forward of the same batch.

Every ratio is the median of per-round ratios; in each round the two sides run in alternating order.

Run:  .venv/bin/python benchmarks/bench_limits.py               (about 25 minutes on 2 cores)
      .venv/bin/python benchmarks/bench_limits.py --rows 1 3    (some rows only)
      .venv/bin/python benchmarks/bench_limits.py --rows 1 --configs ours   (one configuration)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import CONFIGURATIONS, PlainStep, tiny_problem, vitb32_problem  # noqa: E402

from paretomerge import ParetoMerging  # noqa: E402
from paretomerge.front import evaluate_front, summary_preferences  # noqa: E402
from paretomerge.kernels import forward_tasks, materialize  # noqa: E402
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION  # noqa: E402
from paretomerge.preferences import sample_dirichlet  # noqa: E402

TARGETS = {1: 1.10, 2: 0.05, 3: 1.10, 4: 1.5, 5: 1.2}


def alternate(first: Callable[[int], None], second: Callable[[int], None], rounds: int) -> list[float]:
    """Per-round ratios time(first) / time(second); the order flips every round."""
    ratios = []
    for r in range(rounds):
        seconds = {}
        for name, fn in ((("a", first), ("b", second)) if r % 2 == 0 else (("b", second), ("a", first))):
            start = time.perf_counter()
            fn(r)
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["a"] / seconds["b"])
    return ratios


def pm_step(model: ParetoMerging, batches: list[dict[str, torch.Tensor]]) -> Callable[[int], None]:
    """One Pareto Merging step as `training_step` + `optimizer_step` run it, without the Trainer's logging."""
    opt = model.configure_optimizers()
    num_tasks = model.task_vectors.num_tasks

    def step(r: int) -> None:
        gamma = sample_dirichlet(num_tasks, 1.0, 0, r)
        model.objective(model(batches[r % len(batches)], gamma), gamma)["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.clamp_lambdas()

    return step


def trained_looking(model: ParetoMerging) -> ParetoMerging:
    """G (and ω) away from 0, so that Δ(γ) and the preference part are not zero; the basis built before timing."""
    with torch.no_grad():
        for g in model.preference_tensor.G:
            g.normal_(std=0.01)
        if model.omega is not None:
            model.omega.normal_(std=0.05)
    model.preference_basis()
    return model


def row_step(name: str, problem: tuple, rounds: int, config: str) -> tuple[str, float, str]:
    tv, batches = problem
    model = trained_looking(ParetoMerging(task_vectors=tv, **CONFIGURATIONS[config]))
    plain = PlainStep(tv, model)
    pm = pm_step(model, batches)
    pm(0), plain(batches[0], sample_dirichlet(tv.num_tasks, 1.0, 0, 0))  # warm-up
    ratios = alternate(pm, lambda r: plain(batches[r % len(batches)], sample_dirichlet(tv.num_tasks, 1.0, 0, r)),
                       rounds)
    images = sum(x.shape[0] for x in batches[0].values())
    return f"PM step / plain step, {name} (K={tv.num_tasks}, {images} images), {config}", statistics.median(ratios), \
        f"{min(ratios):.3f}–{max(ratios):.3f}"


def row_merge_share(problem: tuple, rounds: int, config: str) -> tuple[str, float, str]:
    tv, batches = problem
    model = trained_looking(ParetoMerging(task_vectors=tv, **CONFIGURATIONS[config]))
    opt = model.configure_optimizers()
    shares = []
    for r in range(rounds + 1):
        gamma = sample_dirichlet(tv.num_tasks, 1.0, 0, r)
        start = time.perf_counter()
        params = model.merged_parameters(gamma)  # θ(γ): the base, the preference part and Δ(γ)
        merged = time.perf_counter()
        logits = forward_tasks(tv.backbone, tv.heads, params, batches[r % len(batches)])
        model.objective(logits, gamma)["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.clamp_lambdas()
        if r:  # round 0 warms up
            shares.append((merged - start) / (time.perf_counter() - start))
    images = sum(x.shape[0] for x in batches[0].values())
    return f"(merge + Δ) / PM step, ViT-B/32 (K={tv.num_tasks}, {images} images), {config}", \
        statistics.median(shares), f"{min(shares):.3f}–{max(shares):.3f}"


def row_evaluation(rounds: int, config: str) -> tuple[str, float, str]:
    from paretomerge.suites import TinySuite

    suite = TinySuite(progress=False)
    tv = suite.task_vectors()
    model = trained_looking(ParetoMerging(task_vectors=tv, **CONFIGURATIONS[config]))
    preferences = summary_preferences(tv.num_tasks)
    unmerged = materialize(tv, tv.theta0)
    suite.evaluate(unmerged, split="val")  # decode the validation split once, before timing

    def front(_: int) -> None:
        evaluate_front(model, suite, preferences, progress=False, split="val")

    def plain(_: int) -> None:
        for _ in range(len(preferences)):
            suite.evaluate(unmerged, split="val")

    front(0)
    ratios = alternate(front, plain, rounds)
    return f"evaluating P={len(preferences)} preferences / P plain forwards, TinySuite val, {config}", \
        statistics.median(ratios), f"{min(ratios):.3f}–{max(ratios):.3f}"


def child_at(tasks: int, per_task: int, rounds: int) -> dict[str, list[float] | float]:
    """In its own process (so the heap left by other rows does not decide which side pays for fresh pages)."""
    tv, _ = vitb32_problem(tasks, per_task)
    model = ParetoMerging(task_vectors=tv, **PAPER_CONFIGURATION)
    with torch.no_grad():
        for g in model.preference_tensor.G:
            g.normal_(std=0.01)
    start = time.perf_counter()
    model.at(sample_dirichlet(tv.num_tasks, 1.0, 0, 0))
    cold = time.perf_counter() - start
    copy.deepcopy(tv.backbone)
    ratios = alternate(lambda r: model.at(sample_dirichlet(tv.num_tasks, 1.0, 0, r)),
                       lambda r: copy.deepcopy(tv.backbone), rounds)
    return {"ratios": ratios, "cold": cold}


def row_at(tasks: int, per_task: int, rounds: int) -> tuple[str, float, str]:
    out = child("at", tasks, per_task, rounds)
    ratios = out["ratios"]
    return (f"`at(γ)` / `deepcopy(backbone)`, ViT-B/32 K={tasks} (the first call also merges the base: "
            f"{out['cold']:.2f} s)"), statistics.median(ratios), f"{min(ratios):.3f}–{max(ratios):.3f}"


def child(kind: str, tasks: int, per_task: int, rounds: int = 5) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--tasks", str(tasks), "--per-task",
                          str(per_task), "--rounds", str(rounds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc. Unlike ``ru_maxrss``, ``VmHWM`` starts afresh
    at ``exec``, so a child does not inherit the peak of the large process that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_fit(tasks: int, per_task: int) -> dict[str, float]:
    """In its own process: peak RSS of a 3-step Pareto Merging fit above the RSS after imports."""
    import lightning as L
    from torch.utils.data import DataLoader

    baseline = status_mib("VmRSS")
    tv, batches = vitb32_problem(tasks, per_task)
    model = ParetoMerging(task_vectors=tv, **PAPER_CONFIGURATION)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    peak = status_mib("VmHWM")
    param_bytes = sum(p.numel() * p.element_size() for p in tv.backbone.parameters())
    return {"baseline_mib": baseline, "peak_mib": peak, "param_mib": param_bytes / 2**20}


def child_activations(tasks: int, per_task: int) -> dict[str, float]:
    """In its own process: bytes autograd saves for backward in one plain forward (weights excluded)."""
    tv, batches = vitb32_problem(tasks, per_task)
    weights = {p.untyped_storage().data_ptr() for p in tv.backbone.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    plain = tv.backbone.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = plain(torch.cat(list(batches[0].values())))
    features.sum().backward()
    return {"activation_mib": sum(saved.values()) / 2**20}


def row_rss(tasks: int, per_task: int, runs: int) -> tuple[str, float, str]:
    act = child("activations", tasks, per_task)
    fits = [child("fit", tasks, per_task) for _ in range(runs)]
    used = [f["peak_mib"] - f["baseline_mib"] for f in fits]
    floor = (tasks + 3) * fits[0]["param_mib"] + act["activation_mib"]
    detail = (f"peak − after-imports: median {statistics.median(used):.0f} MiB of {runs} fits "
              f"({min(used):.0f}–{max(used):.0f}); floor ({tasks}+3)×{fits[0]['param_mib']:.0f} + "
              f"{act['activation_mib']:.0f} = {floor:.0f} MiB")
    return f"peak RSS of a ViT-B/32 K={tasks} PM fit / ((K+3)·params + activations)", \
        statistics.median(used) / floor, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per ratio, and fits for row 5 (at least 5)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=2, help="ViT-B/32 images per task")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS),
                        help="configurations for rows 1-3")
    parser.add_argument("--child", choices=("fit", "activations", "at"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "at":
            print(json.dumps(child_at(args.tasks, args.per_task, args.rounds)))
        else:
            print(json.dumps((child_fit if args.child == "fit" else child_activations)(args.tasks, args.per_task)))
        return
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    vit = vitb32_problem(args.tasks, args.per_task) if {1, 2} & set(args.rows) else None
    results = []
    for row in sorted(set(args.rows)):
        if row == 1:
            tiny = tiny_problem()
            for config in args.configs:
                results.append((1, *row_step("TinySuite", tiny, args.rounds, config)))
                results.append((1, *row_step("ViT-B/32", vit, args.rounds, config)))
        elif row == 2:
            results += [(2, *row_merge_share(vit, args.rounds, config)) for config in args.configs]
        elif row == 3:
            results += [(3, *row_evaluation(args.rounds, config)) for config in args.configs]
        elif row == 4:
            results.append((4, *row_at(args.tasks, args.per_task, 3 * args.rounds)))  # allocation-bound: more rounds
        elif row == 5:
            results.append((5, *row_rss(args.tasks, args.per_task, args.rounds)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds per ratio\n")
    print("| row | ratio | measured (median) | spread / detail | target | met |\n|---|---|---:|---|---:|---|")
    for row, label, value, detail in results:
        shown = f"{100 * value:.1f}%" if row == 2 else f"{value:.3f}"
        target = f"≤ {100 * TARGETS[row]:.0f}%" if row == 2 else f"≤ {TARGETS[row]}"
        print(f"| {row} | {label} | {shown} | {detail} | {target} | {'yes' if value <= TARGETS[row] else 'no'} |")


if __name__ == "__main__":
    main()
