"""The compact Pareto set (issue 25): what ours' preference basis rank costs in quality and buys in storage.

Quality (``--quality``): ParetoMerging (ours) fitted on the TinySuite for each basis rank and seed (500 steps, batch 16
per task, as configs/tiny.yaml), then evaluated on the labeled test split at the FitSummary's preference set (the
equal preference, the K one-hots and Dirichlet draws, 30 in all for K = 8): the mean accuracy at the equal preference,
for how many tasks at(e_k) beats the equal preference on task k and the mean rise, and the hypervolume (reference 0).
The same run writes the `.ckpt` (``trainer.save_checkpoint``) and the export, and gives their size against θ0 + heads.

Sizes (``--sizes``): open_clip ViT-B/32 at K = 8 and K = 20 and ViT-L/14 at K = 8, random weights (``pretrained=None``:
size depends only on the architecture), random task vectors, one training step (so Adam's state is in the `.ckpt`),
then the `.ckpt` and the export at each rank against one backbone. One truncated SVD is computed at the largest rank
asked; each smaller rank's factors are its leading columns (the truncated SVD at rank r is the first r singular
triplets), which is what `PreferenceBasis.truncated` would compute, without 40 minutes of SVDs on a CPU.

    python benchmarks/bench_compact.py --quality                      # tiny suite, seeds 0-2, every rank (~25 min)
    python benchmarks/bench_compact.py --quality --seeds 0 --ranks full 2
    python benchmarks/bench_compact.py --quality --keep-vectors --ranks 16  # ablation: 1-D task vectors in the basis
    python benchmarks/bench_compact.py --quality --float-factors --ranks 16 # ablation: float factors, not int8
    python benchmarks/bench_compact.py --quality --sizes                   # both, and the two joined in one table
    python benchmarks/bench_compact.py --sizes                        # open_clip sizes (~15 min, 16 GB of RAM)
    python benchmarks/bench_compact.py --kernel --ranks full 16 8     # the preference part's cost on ViT-B/32

Kernel (``--kernel``): the preference part alone, ``kernels.merge(base, basis, c − λ)`` with gradients to the
coefficients (forward and backward), on ViT-B/32's layers with K = 8 random task vectors, for the full basis and each
rank: milliseconds (median, alternating the ranks each round) and the bytes of basis it reads.

Every fit runs alone on the CPU (2 cores here): do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paretomerge import ModuleSpec, ParetoMerging, TaskVectors, export_pareto_set, merge
from paretomerge.front import evaluate_front, summary_preferences
from paretomerge.kernels import PreferenceBasis, basis
from paretomerge.modules.pareto_merging import DEFAULT_BASIS_RANK, PAPER_CONFIGURATION
from paretomerge.pareto import hypervolume

MIB = 2**20
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_step's ViT-B/32 problem


def parse_rank(text: str) -> int | float | None:
    if text in ("full", "None"):
        return None
    return float(text) if "." in text else int(text)


def rank_label(rank: int | float | None) -> str:
    return "full" if rank is None else str(rank)


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0)


def stored_sizes(fitted: L.Trainer, model: ParetoMerging) -> tuple[int, int]:
    """Bytes of the `.ckpt` (``trainer.save_checkpoint``) and of the export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ckpt"
        fitted.save_checkpoint(path)
        ckpt_bytes = path.stat().st_size
        path.unlink()
        export_bytes = export_pareto_set(model, Path(tmp) / "set.safetensors").stat().st_size
    return ckpt_bytes, export_bytes


def model_bytes(tv: TaskVectors, heads: bool = True) -> int:
    modules = [tv.backbone, tv.heads] if heads else [tv.backbone]
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


# ---------------------------------------------------------------------------------------------------- quality
def quality(seed: int, rank: int | float | None, steps: int, batch_size: int, tasks: list[str] | None) -> dict:
    from paretomerge.suites import TinySuite

    suite = TinySuite(seed=seed, batch_size=batch_size, progress=False, **({"tasks": tasks} if tasks else {}))
    model = ParetoMerging(seed=seed, basis_rank=rank)
    fitted = trainer(steps)
    start = time.perf_counter()
    fitted.fit(model, datamodule=suite)
    seconds = time.perf_counter() - start
    preferences = summary_preferences(len(suite.tasks), 0)
    front = evaluate_front(model, suite, preferences, progress=False).numpy()
    num_tasks = len(suite.tasks)
    own = front[1 + np.arange(num_tasks), np.arange(num_tasks)]
    ckpt_bytes, export_bytes = stored_sizes(fitted, model)
    tv = model.task_vectors
    return {"seed": seed, "rank": rank_label(rank), "equal": 100 * front[0].mean(), "wins": int((own > front[0]).sum()),
            "rise": 100 * float((own - front[0]).mean()), "hv": hypervolume(front), "fit_s": seconds,
            "basis_mib": model.preference_basis().nbytes() / MIB, "ckpt_ratio": ckpt_bytes / model_bytes(tv),
            "export_ratio": export_bytes / model_bytes(tv), "tasks": num_tasks}


def quality_table(results: list[dict]) -> str:
    """One row per rank: per-seed values, then the mean; the differences to the full basis on the same seeds."""
    by_rank: dict[str, list[dict]] = {}
    for row in results:
        by_rank.setdefault(row["rank"], []).append(row)
    full = {r["seed"]: r for r in by_rank.get("full", [])}
    lines = ["| basis rank | of a 64-wide layer's rank | basis MiB | .ckpt / (θ0 + heads) | export / (θ0 + heads) "
             "| equal % (per seed) | Δ equal vs full (worst) | one-hot wins | mean rise (per seed) "
             "| Δ rise vs full (worst) | HV (per seed) | ΔHV vs full, relative (worst) |",
             "|---|---|---:|---:|---:|---|---:|---|---|---:|---|---:|"]
    for rank, rows in by_rank.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        base = [full.get(r["seed"]) for r in rows]

        def worst(key: str, relative: bool = False, rows=rows, base=base, rank=rank) -> str:
            gaps = [(r[key] - b[key]) / (b[key] if relative else 1.0) for r, b in zip(rows, base, strict=True) if b]
            if not gaps or rank == "full":
                return "–"
            value = min(gaps)
            return f"{100 * value:+.2f}%" if relative else f"{value:+.2f}"

        fraction = "1" if rank == "full" else str(Fraction(min(float(rank.split()[0]), 64) / 64).limit_denominator(64))
        def each(key: str, form: str, rows=rows) -> str:
            return " / ".join(format(r[key], form) for r in rows)

        lines.append(
            f"| {rank} | {fraction} | {statistics.mean(r['basis_mib'] for r in rows):.3f} "
            f"| {statistics.mean(r['ckpt_ratio'] for r in rows):.2f} "
            f"| {statistics.mean(r['export_ratio'] for r in rows):.2f} "
            f"| {each('equal', '.1f')} | {worst('equal')} "
            f"| {' / '.join(str(r['wins']) + '/' + str(r['tasks']) for r in rows)} "
            f"| {each('rise', '+.1f')} | {worst('rise')} | {each('hv', '.4f')} | {worst('hv', relative=True)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- sizes
def leading(full: PreferenceBasis, rank: int, tau: dict[str, torch.Tensor]) -> PreferenceBasis:
    """The rank-``rank`` basis from a larger one: each factored layer's leading columns (the truncated SVD at rank r
    is the first r singular triplets, and int8 scales are per column), dense where `basis.layer_rank` says dense; a
    layer dense at the larger rank but factored at this one gets its own SVD."""
    dense, factors = {}, {}
    for name, values in tau.items():
        r = basis.layer_rank(tuple(values.shape[1:]), rank)
        if r == 0:
            continue
        if r is None:
            dense[name] = full.dense[name]  # dense at rank r, so dense at any larger rank too
        elif name in full.factors:
            factors[name] = tuple(basis.Factor(side.codes[..., :r].contiguous(),
                                               None if side.scale is None else side.scale[..., :r].contiguous())
                                  for side in full.factors[name])
        else:
            factors[name] = tuple(basis.Factor.quantize(f, basis.FACTOR_BITS) for f in basis.truncated_svd(values, r))
    return PreferenceBasis({n: tuple(t.shape[1:]) for n, t in tau.items()}, full.num_tasks, dense, factors)


def clip_sizes(model_name: str, num_tasks: int, ranks: list[int | float | None]) -> list[dict]:
    torch.manual_seed(0)
    spec = ModuleSpec("open_clip:create_model", {"model_name": model_name, "pretrained": None}, attr="visual")
    pretrained = spec.build()
    names = [f"task{k}" for k in range(num_tasks)]
    state = pretrained.state_dict()
    finetuned = [lambda state=state: {k: v + 1e-3 * torch.randn_like(v) for k, v in state.items()} for _ in names]
    heads = {n: nn.Linear(pretrained.output_dim, 10) for n in names}
    tv = TaskVectors.from_state_dicts(pretrained, finetuned, names, heads, copy_backbone=False)
    if any(isinstance(r, float) for r in ranks):
        raise ValueError("--sizes takes integer ranks (and full)")
    largest = max((r for r in ranks if r is not None), default=None)
    start = time.perf_counter()
    truncated = PreferenceBasis.truncated(tv.tau, largest) if largest else None
    svd_seconds = time.perf_counter() - start
    size = pretrained.image_size[0] if isinstance(pretrained.image_size, tuple) else pretrained.image_size
    loader = CombinedLoader({n: DataLoader(TensorDataset(torch.randn(1, 3, size, size)), batch_size=1) for n in names},
                            "max_size_cycle")
    model = ParetoMerging(task_vectors=tv, basis_rank=largest)
    model._basis = truncated  # the step trains with it (no second SVD)
    fitted = trainer(1)
    fitted.fit(model, train_dataloaders=loader)  # one step, so the optimizer state exists
    one = model_bytes(tv, heads=False)
    rows = []
    for rank in ranks:
        model.hparams.basis_rank = rank
        model._basis = PreferenceBasis.full(tv.tau) if rank is None else leading(truncated, rank, tv.tau)
        ckpt_bytes, export_bytes = stored_sizes(fitted, model)
        rows.append({"model": model_name, "tasks": num_tasks, "rank": rank_label(rank),
                     "ckpt": ckpt_bytes / one, "export": export_bytes / one, "backbone_mib": one / MIB,
                     "basis_mib": model._basis.nbytes() / MIB, "svd_s": svd_seconds})
        print(json.dumps(rows[-1]), flush=True)
    paper = ParetoMerging(task_vectors=tv, **PAPER_CONFIGURATION)
    fitted = trainer(1)
    fitted.fit(paper, train_dataloaders=loader)
    ckpt_bytes, export_bytes = stored_sizes(fitted, paper)
    rows.append({"model": model_name, "tasks": num_tasks, "rank": "paper", "ckpt": ckpt_bytes / one,
                 "export": export_bytes / one, "backbone_mib": one / MIB, "basis_mib": 0.0, "svd_s": 0.0})
    return rows


def sizes_table(rows: list[dict]) -> str:
    lines = ["| backbone | K | one backbone MiB | basis rank | basis MiB | .ckpt / backbone | export / backbone |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        rank = "the paper's configuration (no basis)" if r["rank"] == "paper" else r["rank"]
        lines.append(f"| {r['model']} | {r['tasks']} | {r['backbone_mib']:.0f} | {rank} | {r['basis_mib']:.1f} "
                     f"| {r['ckpt']:.3f} | {r['export']:.3f} |")
    return "\n".join(lines)


def joined_table(results: list[dict], rows: list[dict]) -> str:
    """One row per rank: the TinySuite's worst-seed quality gaps to the full basis and its sizes, then each open_clip
    model's `.ckpt` / backbone (export / backbone)."""
    models = list(dict.fromkeys((r["model"], r["tasks"]) for r in rows))
    full = {r["seed"]: r for r in results if r["rank"] == "full"}
    head = ("| basis rank | Δ equal (worst) | one-hot wins (worst) | Δ rise (worst) | ΔHV relative (worst) "
            "| TinySuite .ckpt (export) / (θ0 + heads) | "
            + " | ".join(f"{m} K={k} .ckpt (export) / backbone" for m, k in models) + " |")
    lines = [head, "|---" * (6 + len(models)) + "|"]
    for rank in dict.fromkeys([r["rank"] for r in results] + [r["rank"] for r in rows if r["rank"] != "paper"]):
        mine = [r for r in results if r["rank"] == rank]
        gaps = [(r, full[r["seed"]]) for r in mine if r["seed"] in full]
        if rank != "full" and gaps:
            cells = [f"{min(r['equal'] - b['equal'] for r, b in gaps):+.2f}",
                     f"{min(r['wins'] for r in mine)}/{mine[0]['tasks']}",
                     f"{min(r['rise'] - b['rise'] for r, b in gaps):+.2f}",
                     f"{100 * min((r['hv'] - b['hv']) / b['hv'] for r, b in gaps):+.2f}%"]
        else:
            cells = ["–", f"{min(r['wins'] for r in mine)}/{mine[0]['tasks']}" if mine else "–", "–", "–"]
        cells.append(f"{statistics.mean(r['ckpt_ratio'] for r in mine):.2f} "
                     f"({statistics.mean(r['export_ratio'] for r in mine):.2f})" if mine else "–")
        for model, tasks in models:
            size = [r for r in rows if (r["model"], r["tasks"], r["rank"]) == (model, tasks, rank)]
            cells.append(f"{size[0]['ckpt']:.3f} ({size[0]['export']:.3f})" if size else "–")
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    for model, tasks in models:
        paper = [r for r in rows if (r["model"], r["tasks"], r["rank"]) == (model, tasks, "paper")]
        if paper:
            lines.append(f"\nThe paper's configuration (no basis), {model} K={tasks}: .ckpt {paper[0]['ckpt']:.3f}, "
                         f"export {paper[0]['export']:.3f} of one backbone.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- kernel
def kernel(ranks: list[int | float | None], rounds: int, num_tasks: int = 8) -> str:
    from profile_step import vitb32_problem

    tv, _ = vitb32_problem(num_tasks, 1)
    base = {n: t.detach().clone() for n, t in tv.theta0.items()}
    bases = {rank_label(r): PreferenceBasis.truncated(tv.tau, r) for r in ranks}
    coefficients = (0.1 * torch.randn(len(base), num_tasks)).requires_grad_(True)
    times: dict[str, list[float]] = {label: [] for label in bases}
    for round_ in range(rounds + 1):
        order = list(bases) if round_ % 2 == 0 else list(reversed(bases))
        for label in order:
            start = time.perf_counter()
            merged = merge(base, bases[label], coefficients)
            sum(t.sum() for n, t in merged.items() if n in bases[label].names).backward()
            coefficients.grad = None
            if round_:  # round 0 warms up
                times[label].append(time.perf_counter() - start)
    full = statistics.median(times["full"]) if "full" in times else None
    lines = [f"ViT-B/32 visual tower, K={num_tasks}, {rounds} rounds, torch threads {torch.get_num_threads()}\n",
             "| basis | basis MiB (read per merge) | forward + backward ms (median) | against the full basis |",
             "|---|---:|---:|---:|"]
    for label, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / full:.3f}" if full else "–"
        lines.append(f"| {label} | {bases[label].nbytes() / MIB:.1f} | {1000 * median:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true", help="fit the TinySuite at each rank and seed")
    parser.add_argument("--sizes", action="store_true", help="open_clip .ckpt and export sizes at each rank")
    parser.add_argument("--kernel", action="store_true", help="the preference part's cost on ViT-B/32 at each rank")
    parser.add_argument("--rounds", type=int, default=7, help="rounds for --kernel")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", nargs="+", default=["full", "16", "12", "8", "4", "2", "1"],
                        help="basis ranks: full, an int, or a fraction of each layer's rank such as 0.0625")
    parser.add_argument("--tasks", nargs="+", default=None, help="a TinySuite task subset (default: all eight)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep-vectors", action="store_true",
                        help="ablation: keep the 1-D task vectors (biases, norms) dense in a truncated basis")
    parser.add_argument("--float-factors", action="store_true",
                        help="ablation: store the factors as the SVD's floats instead of int8 codes")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32:8", "ViT-B-32:20", "ViT-L-14:8"],
                        help="open_clip model:K for --sizes")
    parser.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    args = parser.parse_args()
    if not (args.quality or args.sizes or args.kernel):
        parser.error("say --quality, --sizes or --kernel")
    ranks = [parse_rank(r) for r in args.ranks]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default basis_rank {DEFAULT_BASIS_RANK}\n")
    if args.keep_vectors:
        plain = basis.layer_rank
        basis.layer_rank = lambda shape, rank: None if rank is not None and len(shape) < 2 else plain(shape, rank)
    if args.float_factors:
        basis.FACTOR_BITS = None
    ablation = " (1-D dense)" if args.keep_vectors else ""
    ablation += " (float factors)" if args.float_factors else ""
    results, rows = [], []
    if args.quality:
        for seed in args.seeds:
            for rank in ranks:
                row = quality(seed, rank, args.steps, args.batch_size, args.tasks)
                row["rank"] += ablation if rank is not None else ""
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with Path(args.out).open("a") as handle:
                        handle.write(json.dumps({"kind": "quality", **row}) + "\n")
        num_tasks = results[0]["tasks"]
        print(f"\nTinySuite, {num_tasks} tasks{' (' + ', '.join(args.tasks) + ')' if args.tasks else ''}, "
              f"{args.steps} steps, batch {args.batch_size} per task, test split, "
              f"{len(summary_preferences(num_tasks, 0))} preferences\n")
        print(quality_table(results))
    if args.sizes:
        for item in args.models:
            name, _, k = item.partition(":")
            new = clip_sizes(name, int(k or 8), ranks)
            rows += new
            if args.out:
                with Path(args.out).open("a") as handle:
                    for row in new:
                        handle.write(json.dumps({"kind": "sizes", **row}) + "\n")
        print("\nopen_clip visual towers, random weights, after one training step\n")
        print(sizes_table(rows))
    if args.quality and args.sizes:
        print("\nJoined: the TinySuite's quality (worst seed against the full basis) and the stored sizes, by rank\n")
        print(joined_table(results, rows))
    if args.kernel:
        print(kernel(ranks, args.rounds))


if __name__ == "__main__":
    main()
