"""Task vectors stored in bf16 against fp32 on the TinySuite: the memory they take, the merge's time, and the effect
on what Pareto Merging and AdaMerging learn (same seed, same steps). Prints Markdown.

bf16 τ is `TaskVectors.with_tau` of the fp32 stacks cast to bf16; θ0 stays fp32 and every merge computes in fp32
(`kernels.merge`). Accuracies are on the TinySuite's test split; the front is `front.summary_preferences` (30 points
for K=8) and its hypervolume is pymoo's, as the front logger reports it.

Run:  .venv/bin/python benchmarks/bench_bf16_tau.py            (about 5 minutes on 2 cores)
      .venv/bin/python benchmarks/bench_bf16_tau.py --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import Runner  # noqa: E402

from paretomerge import AdaMerging, ParetoMerging, merge  # noqa: E402
from paretomerge.front import evaluate_front, summary_preferences  # noqa: E402
from paretomerge.pareto import hypervolume  # noqa: E402
from paretomerge.suites import TinySuite  # noqa: E402


def merge_ms(tv, rounds: int = 20) -> float:
    lam = torch.full((len(tv.layer_names), tv.num_tasks), 0.3, requires_grad=True)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sum(v.sum() for v in merge(tv.theta0, tv.tau, lam).values()).backward()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    suite = TinySuite(progress=False)
    runner = Runner(suite, args.steps)
    fp32 = runner.tv
    variants = {"fp32": fp32, "bf16": fp32.with_tau({n: t.bfloat16() for n, t in fp32.tau.items()})}
    preferences = summary_preferences(fp32.num_tasks)
    rows, lambdas = [], {}
    for name, tv in variants.items():
        pm, _ = runner.fit(ParetoMerging, task_vectors=tv)
        ada, _ = runner.fit(AdaMerging, task_vectors=tv)
        front = evaluate_front(pm, suite, preferences, progress=False).numpy()
        equal = runner.accuracy(pm.at(torch.full((tv.num_tasks,), 1.0 / tv.num_tasks)))
        lambdas[name] = (pm.lambdas.detach().clone(), ada.lambdas.detach().clone())
        rows.append([name, f"{tv.nbytes() / 2**20:.2f}", f"{merge_ms(tv):.2f}", f"{100 * equal.mean():.2f}",
                     f"{hypervolume(front):.4f}", f"{100 * runner.accuracy(ada.at()).mean():.2f}"])
    print(f"TinySuite (K={fp32.num_tasks}), {args.steps} steps, seed 0, torch {torch.__version__}\n")
    print("| τ dtype | τ MiB | merge fwd+bwd ms | PM equal-pref mean acc % | PM front HV | AdaMerging mean acc % |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    pm_gap = float((lambdas["fp32"][0] - lambdas["bf16"][0]).abs().max())
    ada_gap = float((lambdas["fp32"][1] - lambdas["bf16"][1]).abs().max())
    print(f"\nmax |λ_fp32 − λ_bf16| after training: Pareto Merging {pm_gap:.2e}, AdaMerging {ada_gap:.2e}")
    print(f"τ bytes bf16 / fp32: {variants['bf16'].nbytes() / fp32.nbytes():.3f}")


if __name__ == "__main__":
    main()
