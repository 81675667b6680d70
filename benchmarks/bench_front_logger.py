"""What `ParetoFrontLogger` costs the main job: `paretomerge fit --config configs/tiny.yaml` with and without it
(alternating, the suite cached), and one front evaluation taken apart. Prints Markdown tables.

    python benchmarks/bench_front_logger.py --rounds 2      (about 4 minutes a round on 2 cores)
    python benchmarks/bench_front_logger.py --rounds 0      (the breakdown only)

"Without" is configs/tiny.yaml with the logger's entry removed (written to a temporary file). Runs alternate, so
drift on a shared machine hits both; read the ratio of medians.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
LOGGER_ENTRY = "    - class_path: paretomerge.callbacks.ParetoFrontLogger"


def config_without_logger(directory: Path) -> Path:
    lines = CONFIG.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(LOGGER_ENTRY))
    end = start + 1
    while end < len(lines) and lines[end].startswith("      "):  # the entry's init_args
        end += 1
    path = directory / "tiny_without_front_logger.yaml"
    path.write_text("\n".join(lines[:start] + lines[end:]) + "\n")
    return path


def fit_seconds(config: Path) -> float:
    exe = Path(sys.executable).parent / "paretomerge"
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        subprocess.run([str(exe), "fit", "--config", str(config), "--trainer.enable_progress_bar", "false"],
                       cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def breakdown(repeats: int) -> list[tuple[str, float]]:
    """Median seconds of each part of one evaluation of the 8-task front (the model at its init: the cost does not
    depend on the weights)."""
    import torch

    from paretomerge import ParetoMerging
    from paretomerge.front import evaluate_front, summary_preferences
    from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION
    from paretomerge.plotting import front_figures
    from paretomerge.suites import TinySuite

    torch.set_num_threads(2)
    suite = TinySuite(progress=False)
    model = ParetoMerging(task_vectors=suite.task_vectors(), **PAPER_CONFIGURATION)
    prefs = summary_preferences(8)
    suite.labeled("val")
    parts: dict[str, list[float]] = {"evaluate 30 preferences × 8 tasks (val, 256 images each)": [],
                                     "build the figures (pairwise grid + parallel coordinates)": [],
                                     "render them to PNG (what add_figure does)": []}
    names = list(parts)
    for _ in range(repeats):
        start = time.perf_counter()
        acc = evaluate_front(model, suite, prefs, progress=False, split="val").numpy()
        parts[names[0]].append(time.perf_counter() - start)
        start = time.perf_counter()
        figures = front_figures(acc, prefs.numpy(), list(suite.tasks))
        parts[names[1]].append(time.perf_counter() - start)
        start = time.perf_counter()
        for figure in figures.values():
            figure.savefig(io.BytesIO(), format="png")
        parts[names[2]].append(time.perf_counter() - start)
    return [(name, statistics.median(values)) for name, values in parts.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating with/without pairs of the main job")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the breakdown")
    args = parser.parse_args()
    if args.rounds > 0:
        with tempfile.TemporaryDirectory() as directory:
            without = config_without_logger(Path(directory))
            times: dict[str, list[float]] = {"with": [], "without": []}
            for r in range(args.rounds):
                order = [("without", without), ("with", CONFIG)] if r % 2 == 0 else [("with", CONFIG),
                                                                                   ("without", without)]
                for label, config in order:
                    times[label].append(fit_seconds(config))
                    print(f"round {r + 1}: {label} {times[label][-1]:.1f} s", file=sys.stderr)
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        print("| main job (suite cached) | median s | runs |\n| --- | --- | --- |")
        print(f"| with ParetoFrontLogger (every validation: 5 fronts + the final one) | {w:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in times['with'])} |")
        print(f"| without | {wo:.1f} | {', '.join(f'{t:.1f}' for t in times['without'])} |")
        print(f"\nratio with / without: {w / wo:.2f}; the logger adds {w - wo:.1f} s\n")
    print("| one front evaluation, K = 8 | median s |\n| --- | --- |")
    for name, seconds in breakdown(args.repeats):
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
