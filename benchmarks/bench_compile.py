"""`torch.compile` of the merged forward (`compile_forward`) against eager: the one-off compile time and the steady
step time of a Pareto Merging training step, alternating, on the TinySuite. Prints Markdown.

Run:  .venv/bin/python benchmarks/bench_compile.py                   (inductor; needs a C++ compiler on CPU)
      .venv/bin/python benchmarks/bench_compile.py --backend aot_eager
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_limits import alternate, pm_step  # noqa: E402
from profile_step import tiny_problem  # noqa: E402

from paretomerge import ParetoMerging  # noqa: E402
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    tv, batches = tiny_problem()
    eager = pm_step(ParetoMerging(task_vectors=tv, **PAPER_CONFIGURATION), batches)
    compiled = pm_step(ParetoMerging(task_vectors=tv, compile_forward=args.backend, **PAPER_CONFIGURATION), batches)
    eager(0)
    start = time.perf_counter()
    compiled(0)  # compiles the forward and its backward
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiled(1)  # a second γ: no recompilation expected
    second = time.perf_counter() - start
    ratios = alternate(compiled, eager, args.rounds)
    print(f"TinySuite K={tv.num_tasks}, torch {torch.__version__}, {torch.get_num_threads()} threads, backend "
          f"{args.backend!r}, {args.rounds} rounds\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| first compiled step (compiles) | {first:.1f} s |")
    print(f"| second compiled step | {1e3 * second:.1f} ms |")
    print(f"| compiled step / eager step (median of per-round ratios) | {statistics.median(ratios):.3f} |")
    print(f"| spread | {min(ratios):.3f}–{max(ratios):.3f} |")


if __name__ == "__main__":
    main()
