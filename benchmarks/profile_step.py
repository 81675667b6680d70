"""Where one Pareto Merging training step spends its time, phase by phase, against the floor: one ordinary training
step of the same backbone (all weights trainable, Adam) on the same images.

Phases, timed with `time.perf_counter` around each (CPU: every op is synchronous; on a GPU each phase ends with
``torch.cuda.synchronize``):
  data       a copy of the next batch, drawn beforehand (from TinySuite's adaptation loader, or synthetic)
  merge      θ(γ) for every layer (`MergingModule.merged_parameters`): θ0 + Σ λ τ, ours' preference part
             Σ (c(γ) − λ) τ̃, and Δ(γ) (`PreferenceTensor.delta`)
  forward    the functional forward over all K task batches, heads and the objective
  backward   loss.backward()
  optimizer  Adam step, zero_grad, λ clamp

Run:  .venv/bin/python benchmarks/profile_step.py --setup vitb32 --per-task 2 --steps 5
      .venv/bin/python benchmarks/profile_step.py --setup tiny --steps 20
      .venv/bin/python benchmarks/profile_step.py --setup tiny --config ours      (or "ours, full basis"; default paper)
      add --torch-profiler for torch.profiler's top operators of one step
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from paretomerge import ModuleSpec, ParetoMerging, TaskVectors
from paretomerge.kernels import forward_tasks
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
from paretomerge.preferences import sample_dirichlet

PHASES = ("data", "merge", "forward", "backward", "optimizer")
CONFIGURATIONS = {"paper": PAPER_CONFIGURATION, "ours, full basis": {"basis_rank": None}, "ours": {}}


def vitb32_problem(num_tasks: int, per_task: int) -> tuple[TaskVectors, list[dict[str, torch.Tensor]]]:
    spec = ModuleSpec("open_clip:create_model", {"model_name": "ViT-B-32", "pretrained": None}, attr="visual")
    torch.manual_seed(0)
    visual = spec.build()
    names = [f"task{k}" for k in range(num_tasks)]
    theta0 = visual.state_dict()

    def finetuned() -> dict[str, torch.Tensor]:
        return {n: v + 1e-3 * torch.randn_like(v) for n, v in theta0.items()}

    tv = TaskVectors.from_state_dicts(visual, [finetuned for _ in names], names,
                                      {n: nn.Linear(visual.output_dim, 10) for n in names}, backbone_spec=spec,
                                      copy_backbone=False)
    batches = [{n: torch.randn(per_task, 3, 224, 224) for n in names} for _ in range(4)]
    return tv, batches


def tiny_problem() -> tuple[TaskVectors, list[dict[str, torch.Tensor]]]:
    from paretomerge.suites import TinySuite

    suite = TinySuite(progress=False)
    tv = suite.task_vectors()
    loader = iter(suite.train_dataloader())
    batches = [{t: x[0] for t, x in next(loader)[0].items()} for _ in range(4)]
    return tv, batches


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PlainStep:
    """The floor: an ordinary training step of a trainable copy of the backbone (Adam on all its weights) on the same
    images, with the heads and the objective of ``model``. Calling it returns its phases' seconds."""

    def __init__(self, tv: TaskVectors, model: ParetoMerging) -> None:
        self.tv, self.model = tv, model
        self.net = copy.deepcopy(tv.backbone).requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def __call__(self, batch: dict[str, torch.Tensor], gamma: torch.Tensor) -> list[tuple[str, float]]:
        t = time.perf_counter()
        names = list(batch)
        features = self.net(torch.cat([batch[n] for n in names])).split([batch[n].shape[0] for n in names])
        logits = {n: self.tv.heads[n](f) for n, f in zip(names, features, strict=True)}
        loss = self.model.objective(logits, gamma)["loss"]
        sync()
        marks = [("forward", time.perf_counter() - t)]
        t = time.perf_counter()
        loss.backward()
        sync()
        marks.append(("backward", time.perf_counter() - t))
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        sync()
        marks.append(("optimizer", time.perf_counter() - t))
        return marks


def run(tv: TaskVectors, batches: list[dict[str, torch.Tensor]], steps: int, rank: int,
        config: str = "paper") -> dict[str, list[float]]:
    model = ParetoMerging(task_vectors=tv, rank=rank, **CONFIGURATIONS[config])
    model.preference_basis()  # ours: the truncated SVD, once, before timing
    opt = model.configure_optimizers()
    plain = PlainStep(tv, model)
    times: dict[str, list[float]] = defaultdict(list)
    for step in range(steps + 1):  # step 0 warms up
        t = time.perf_counter()
        batch = {k: v.clone() for k, v in batches[step % len(batches)].items()}
        gamma = sample_dirichlet(tv.num_tasks, 1.0, 0, step)
        marks = [("data", time.perf_counter() - t)]
        t = time.perf_counter()
        params = model.merged_parameters(gamma)
        sync()
        marks.append(("merge", time.perf_counter() - t))
        t = time.perf_counter()
        loss = model.objective(forward_tasks(tv.backbone, tv.heads, params, batch), gamma)["loss"]
        sync()
        marks.append(("forward", time.perf_counter() - t))
        t = time.perf_counter()
        loss.backward()
        sync()
        marks.append(("backward", time.perf_counter() - t))
        t = time.perf_counter()
        opt.step()
        opt.zero_grad()
        model.clamp_lambdas()
        sync()
        marks.append(("optimizer", time.perf_counter() - t))
        plain_marks = plain(batch, gamma)
        if step > 0:
            for phase, seconds in marks:
                times[phase].append(seconds)
            for phase, seconds in plain_marks:
                times[f"plain {phase}"].append(seconds)
            times["PM step"].append(sum(s for _, s in marks))
            times["plain step"].append(sum(s for _, s in plain_marks))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=("vitb32", "tiny"), default="vitb32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=2, help="images per task (vitb32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--config", choices=list(CONFIGURATIONS), default="paper")
    parser.add_argument("--torch-profiler", action="store_true")
    args = parser.parse_args()
    tv, batches = vitb32_problem(args.tasks, args.per_task) if args.setup == "vitb32" else tiny_problem()
    times = run(tv, batches, args.steps, args.rank, args.config)
    step = statistics.median(times["PM step"])
    print(f"{args.setup}: K={tv.num_tasks}, {sum(x.shape[0] for x in batches[0].values())} images per step, "
          f"rank {args.rank}, {args.config}, {args.steps} steps after 1 warm-up, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| phase | PM median ms | share of the PM step | plain step median ms |\n|---|---:|---:|---:|")
    for phase in PHASES:
        median = statistics.median(times[phase])
        floor = f"{1000 * statistics.median(times[f'plain {phase}']):.1f}" if f"plain {phase}" in times else "–"
        print(f"| {phase} | {1000 * median:.1f} | {100 * median / step:.1f}% | {floor} |")
    plain = statistics.median(times["plain step"])
    ratios = [p / q for p, q in zip(times["PM step"], times["plain step"], strict=True)]
    print(f"| PM step (sum) | {1000 * step:.1f} | 100% | {1000 * plain:.1f} |\n")
    print(f"PM step / plain step: {step / plain:.3f} (median of per-step ratios {statistics.median(ratios):.3f})")
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(tv, batches, 1, args.rank, args.config)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
