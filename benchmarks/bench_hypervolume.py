"""The front metric at any number of tasks (issue 33, item 2): exact hypervolume (pymoo's HV) against the approximation
`paretomerge.pareto.measure_hypervolume` uses beyond `EXACT_HV_MAX_TASKS` tasks (moocore's Monte-Carlo hv_approx).

1. Time of one exact and one approximate evaluation against K, on 30- and 50-point trade-off fronts (every task
   well above 0, each point better at some tasks than others, as a merged model's front); exact stops where one
   evaluation passes ``--exact-limit`` seconds.
2. The approximation against the exact value on real fronts: every ``front_test.csv`` given (what `FitSummary`
   writes; accuracy columns ``acc_<task>``, or loss columns ``loss_<task>`` with the θ0 reference ``--reference``),
   and on synthetic fronts at K = 6 to 8: relative error, and whether the stated error covers it.

    python benchmarks/bench_hypervolume.py
    python benchmarks/bench_hypervolume.py --csv lightning_logs/tiny/version_0/front_test.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from paretomerge.pareto import ACCURACY, EXACT_HV_MAX_TASKS, LOSS, measure_hypervolume


def trade_off_front(points: int, tasks: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).dirichlet(np.ones(tasks), size=points)
    return 0.6 + 0.4 * np.sqrt(w / w.max(axis=1, keepdims=True))


def timed(front: np.ndarray, method: str, **options) -> tuple[float, float, float]:
    start = time.perf_counter()
    volume = measure_hypervolume(front, method=method, **options)
    return time.perf_counter() - start, volume.value, volume.error


def read_front(path: Path) -> tuple[np.ndarray, str]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c.startswith(("acc_", "loss_"))]
    return np.array([[float(r[c]) for c in columns] for r in rows]), columns[0].split("_")[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", nargs="*", default=[], type=Path, help="front_test.csv files of real fits")
    parser.add_argument("--reference", nargs="*", type=float, default=None,
                        help="θ0's per-task loss, for a loss front (in the CSV's task order)")
    parser.add_argument("--exact-limit", type=float, default=10.0, help="stop timing exact HV past this many seconds")
    args = parser.parse_args(argv)

    print(f"\n### 1. One evaluation, seconds (exact up to K = {EXACT_HV_MAX_TASKS} by default)\n")
    print("| K | points | exact s | approximate s | approximate ± error, relative | approximate − exact, relative |")
    print("|---:|---:|---:|---:|---:|---:|")
    exact_ok = {30: True, 50: True}
    for tasks in (4, 6, 8, 10, 12, 13, 14, 16, 20):
        for points in (30, 50):
            front = trade_off_front(points, tasks, seed=tasks)
            approx_s, approx, error = timed(front, "approximate")
            exact_s, exact = float("nan"), float("nan")
            if exact_ok[points]:
                exact_s, exact, _ = timed(front, "exact")
                exact_ok[points] = exact_s < args.exact_limit / 10  # the next K costs ~10x or more
            gap = f"{(approx - exact) / exact:+.3%}" if np.isfinite(exact) else "–"
            shown = f"{exact_s:.3f}" if np.isfinite(exact_s) else "not run"
            print(f"| {tasks} | {points} | {shown} | {approx_s:.3f} | ± {error / approx:.3%} | {gap} |")

    print("\n### 2. Approximate against exact on fronts\n")
    print("| front | K | points | exact | approximate ± error | relative error | within the stated error |")
    print("|---|---:|---:|---:|---|---:|---|")
    cases = [(f"synthetic K={k} seed {s}", trade_off_front(30, k, seed=100 + s), ACCURACY, None)
             for k in (6, 7, 8) for s in range(3)]
    for path in args.csv:
        values, kind = read_front(path)
        score = ACCURACY if kind == "acc" else LOSS
        if score is LOSS and args.reference is None:
            parser.error(f"{path} is a loss front: give --reference, θ0's loss per task")
        cases.append((str(path), values, score, None if score is ACCURACY else np.array(args.reference)))
    worst = 0.0
    for name, values, score, reference in cases:
        exact = measure_hypervolume(values, score=score, reference=reference, method="exact").value
        approx = measure_hypervolume(values, score=score, reference=reference, method="approximate")
        relative = (approx.value - exact) / exact
        worst = max(worst, abs(relative))
        covered = "yes" if abs(approx.value - exact) <= approx.error else "no"
        print(f"| {name} | {values.shape[1]} | {values.shape[0]} | {exact:.5f} | {approx.value:.5f} ± "
              f"{approx.error:.5f} | {relative:+.3%} | {covered} |")
    print(f"\nWorst relative error: {worst:.3%}")


if __name__ == "__main__":
    main()
