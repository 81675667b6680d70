"""How much do the static merges depend on their scale s? Mean accuracy of Task Arithmetic, TIES, DARE-TA and
DARE-TIES on the TinySuite for several s (SPEC §5 fixes s = 0.3 for all of them), on the validation split (where
a user would choose s) and the test split, and TIES for several top-k at its best validation scale.

    python benchmarks/static_scale_sweep.py              # default 8-task suite; under a minute on 2 cores
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from paretomerge import static_model
from paretomerge.suites import TinySuite

SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
METHODS = ("task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties")


def mean_accuracy(suite: TinySuite, name: str, split: str, **options) -> float:
    accuracy = suite.evaluate(static_model(name, suite.task_vectors(), **options), split=split)
    return float(np.mean(list(accuracy.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="TinySuite tasks (default: all eight)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    suite = TinySuite(tasks=args.tasks, progress=False)

    print("### Mean accuracy (%) by scale s: validation / test\n")
    print("| method | " + " | ".join(f"s = {s}" for s in SCALES) + " | best s on val | its test |")
    print("|---|" + "---:|" * (len(SCALES) + 2))
    best_ties = 0.3
    for name in METHODS:
        cells, val = [], []
        for s in SCALES:
            v, t = mean_accuracy(suite, name, "val", scale=s), mean_accuracy(suite, name, "test", scale=s)
            val.append((v, t, s))
            cells.append(f"{100 * v:.1f} / {100 * t:.1f}")
        v, t, s = max(val)
        if name == "ties":
            best_ties = s
        print(f"| {name} | " + " | ".join(cells) + f" | {s} | {100 * t:.1f} |")

    print(f"\n### TIES by top-k at s = {best_ties}: validation / test mean accuracy (%)\n")
    print("| top_k | val | test |\n|---:|---:|---:|")
    for top_k in (0.05, 0.1, 0.2, 0.5, 1.0):
        v = mean_accuracy(suite, "ties", "val", scale=best_ties, top_k=top_k)
        t = mean_accuracy(suite, "ties", "test", scale=best_ties, top_k=top_k)
        print(f"| {top_k} | {100 * v:.1f} | {100 * t:.1f} |")


if __name__ == "__main__":
    main()
