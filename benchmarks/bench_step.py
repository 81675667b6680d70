"""Time one training step (forward + backward + Adam step) of Pareto Merging, its AdaMerging-equivalent
ablation and a plain backbone, on a small random open_clip ViT on CPU; print Markdown tables.

Variants, all on the same images and the same sampled preferences γ:
  PM     ParetoMerging(rank=r), the paper's configuration: merge θ0 + Σ λτ + Δ(γ) through `kernels.merge`,
         functional forward.
  PM ours  ParetoMerging(rank=r), our default: the same with preference-conditioned coefficients c(γ) and the
         diversity term.
  Ada    ParetoMerging(targets=None), the paper's configuration: the same merged forward with no preference tensor
         (γ only weights the objective), i.e. AdaMerging's layer-wise λ.
  plain  a trainable copy of the backbone run directly (no merge), Adam on all its parameters.
The loss is `ParetoMerging.objective` (what `training_step` minimises; `training_step` itself needs a
Trainer for `self.global_step` and `self.log`), and λ is clamped by `clamp_lambdas` after each step, as
`MergingModule.optimizer_step` does.

Timing: 3 warm-up steps per variant, then R rounds; each round runs one step of every variant in a
rotating order and times each with `time.perf_counter()`. Absolute times on a shared machine are noisy;
the ratios of medians (and the medians of per-round ratios) are what to read.

Also prints the preference tensor's parameter overhead on open_clip ViT-B/32 (random weights).

Run:  .venv/bin/python benchmarks/bench_step.py            (defaults, a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_step.py --quick    (smoke test, seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import open_clip
import tensorly as tl
import torch
from tensorly.tenalg import multi_mode_dot
from torch import nn

from paretomerge.kernels import DEFAULT_TARGETS, ModuleSpec, PreferenceTensor, TaskVectors, select_targets
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION, ParetoMerging
from paretomerge.preferences import sample_dirichlet

TARGETS = {"PM/Ada": 1.15, "Ada/plain": 1.5}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="images per task")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--output-dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-vitb32", action="store_true", help="skip the ViT-B/32 parameter count")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 3 rounds, for a smoke test")
    args = p.parse_args()
    if args.quick:
        args.tasks, args.batch, args.image_size, args.patch_size = 3, 4, 16, 8
        args.width, args.layers, args.output_dim, args.rank, args.rounds, args.warmup = 32, 2, 16, 4, 3, 1
    return args


def build_task_vectors(a: argparse.Namespace) -> TaskVectors:
    spec = ModuleSpec(
        "open_clip.transformer:VisionTransformer",
        {"image_size": a.image_size, "patch_size": a.patch_size, "width": a.width, "layers": a.layers,
         "heads": a.heads, "mlp_ratio": 4.0, "output_dim": a.output_dim},
    )
    pretrained = spec.build()
    names = [f"task{k}" for k in range(a.tasks)]
    finetuned = []
    for _ in names:
        state = {}
        for key, value in pretrained.state_dict().items():
            if value.is_floating_point():
                value = value + 0.1 * value.abs().mean() * torch.randn_like(value)
            state[key] = value.clone()
        finetuned.append(state)
    heads = {n: nn.Linear(a.output_dim, a.classes) for n in names}
    return TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)


def make_steps(tv: TaskVectors, a: argparse.Namespace) -> dict:
    pm = ParetoMerging(task_vectors=tv, rank=a.rank, seed=a.seed, **PAPER_CONFIGURATION)
    ours = ParetoMerging(task_vectors=tv, rank=a.rank, seed=a.seed)
    ada = ParetoMerging(task_vectors=tv, targets=None, seed=a.seed, **PAPER_CONFIGURATION)
    hp = pm.hparams
    plain = copy.deepcopy(tv.backbone).requires_grad_(True)
    names = tv.task_names

    def merging_step(model: ParetoMerging):
        opt = model.configure_optimizers()

        def step(images: dict, gamma: torch.Tensor) -> None:
            model.objective(model(images, gamma), gamma)["loss"].backward()
            opt.step()
            opt.zero_grad()
            model.clamp_lambdas()
        return step

    plain_opt = torch.optim.Adam(plain.parameters(), lr=hp.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def plain_step(images: dict, gamma: torch.Tensor) -> None:
        sizes = [images[t].shape[0] for t in names]
        features = plain(torch.cat([images[t] for t in names]))
        logits = {t: tv.heads[t](x) for t, x in zip(names, features.split(sizes), strict=True)}
        ada.objective(logits, gamma)["loss"].backward()  # Ada has no preference tensor: no Frobenius term
        plain_opt.step()
        plain_opt.zero_grad()

    counts = {"PM": sum(p.numel() for p in pm.parameters()), "PM ours": sum(p.numel() for p in ours.parameters()),
              "Ada": sum(p.numel() for p in ada.parameters()), "plain": sum(p.numel() for p in plain.parameters())}
    return {"PM": merging_step(pm), "PM ours": merging_step(ours), "Ada": merging_step(ada),
            "plain": plain_step}, counts


def delta_cost(tv: TaskVectors, a: argparse.Namespace) -> None:
    """Δ(γ) alone, forward + backward: `PreferenceTensor.delta` (tensorly) against A (Σ_k γ_k G_k) Bᵀ in torch."""
    pt = ParetoMerging(task_vectors=tv, rank=a.rank, seed=a.seed).preference_tensor
    with torch.no_grad():
        for g in pt.G:
            g.normal_()

    def tensorly_delta(gamma: torch.Tensor) -> None:
        sum(d.sum() for d in pt.delta(gamma).values()).backward()

    def matmul_delta(gamma: torch.Tensor) -> None:
        parts = zip(pt.G, pt.A, pt.B, strict=True)
        sum((a_ @ torch.tensordot(g, gamma, dims=1) @ b.T).sum() for g, a_, b in parts).backward()

    def one_call_delta(gamma: torch.Tensor) -> None:  # the kernel before issue 8: one multi_mode_dot over 3 modes
        with tl.backend_context("pytorch"):
            parts = zip(pt.G, pt.A, pt.B, strict=True)
            sum(multi_mode_dot(g, [gamma[None], a_, b], modes=[2, 0, 1]).sum() for g, a_, b in parts).backward()

    times = {"PreferenceTensor.delta (tensorly: γ, then A and B)": [], "A (Σ γ_k G_k) Bᵀ (torch matmul)": [],
             "multi_mode_dot(G, [γ, A, B]) in one call (tensorly, before issue 8)": []}
    fns = (tensorly_delta, matmul_delta, one_call_delta)
    for r in range(a.rounds * 4):
        gamma = sample_dirichlet(a.tasks, 1.0, a.seed, r)
        for name, fn in list(zip(times, fns, strict=True))[:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            fn(gamma)
            times[name].append(time.perf_counter() - start)
            pt.zero_grad()
    print(f"\n### Δ(γ) alone, forward + backward, {len(pt.names)} targets, rank {a.rank}\n")
    print("| computation | median ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.2f} |")


def vitb32_overhead(rank: int, num_tasks: int) -> None:
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    params = dict(visual.named_parameters())
    shapes = select_targets(params, DEFAULT_TARGETS)
    pt = PreferenceTensor(shapes, num_tasks=num_tasks, rank=rank)
    formula = sum((pt.matrix_shape(n)[0] + pt.matrix_shape(n)[1]) * rank + rank * rank * num_tasks
                  for n in shapes)
    backbone = sum(p.numel() for p in visual.parameters())
    print(f"\n### Preference tensor overhead on ViT-B/32 (r={rank}, K={num_tasks})\n")
    print("| quantity | value |\n|---|---|")
    pattern = DEFAULT_TARGETS.replace("|", "\\|")  # keep the table intact
    print(f"| target matrices (`{pattern}`) | {len(shapes)} |")
    print(f"| PreferenceTensor.num_parameters() | {pt.num_parameters():,} |")
    check = "equal" if formula == pt.num_parameters() else "DIFFERS"
    print(f"| Σ_targets [(m+n)·r + r²·K] | {formula:,} ({check}) |")
    print(f"| ViT-B/32 visual parameters | {backbone:,} |")
    print(f"| overhead | {100 * pt.num_parameters() / backbone:.3f}% |")


def main() -> None:
    a = parse_args()
    torch.manual_seed(a.seed)
    tv = build_task_vectors(a)
    steps, counts = make_steps(tv, a)
    generator = torch.Generator().manual_seed(a.seed + 1)
    shape = (a.batch, 3, a.image_size, a.image_size)
    images = {t: torch.randn(shape, generator=generator) for t in tv.task_names}
    order = list(steps)
    times = {v: [] for v in order}
    for i in range(a.warmup):
        for v in order:
            steps[v](images, sample_dirichlet(a.tasks, 1.0, a.seed, i))
    for r in range(a.rounds):
        gamma = sample_dirichlet(a.tasks, 1.0, a.seed, a.warmup + r)
        for v in order[r % 3:] + order[:r % 3]:
            start = time.perf_counter()
            steps[v](images, gamma)
            times[v].append(time.perf_counter() - start)

    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"K={a.tasks}, batch {a.batch}/task, images 3x{a.image_size}x{a.image_size}, ViT width={a.width} "
          f"layers={a.layers} heads={a.heads} patch={a.patch_size} output_dim={a.output_dim}, rank={a.rank}, "
          f"{a.rounds} rounds after {a.warmup} warm-up steps\n")
    print("| variant | trainable params | median ms | min ms | max ms |\n|---|---:|---:|---:|---:|")
    for v in order:
        lo, hi = min(times[v]) * 1e3, max(times[v]) * 1e3
        print(f"| {v} | {counts[v]:,} | {med[v]:.1f} | {lo:.1f} | {hi:.1f} |")
    pairs = {"PM/Ada": ("PM", "Ada"), "Ada/plain": ("Ada", "plain")}
    print("\n| ratio | ratio of medians | median of per-round ratios | target | met |")
    print("|---|---:|---:|---:|---|")
    for name, (x, y) in pairs.items():
        value = med[x] / med[y]
        per_round = statistics.median(p / q for p, q in zip(times[x], times[y], strict=True))
        met = "yes" if value <= TARGETS[name] else "no"
        print(f"| {name} | {value:.3f} | {per_round:.3f} | ≤ {TARGETS[name]} | {met} |")
    delta_cost(tv, a)
    if not a.skip_vitb32:
        vitb32_overhead(16, 8)


if __name__ == "__main__":
    main()
