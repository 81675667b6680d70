"""Wall time of the main job, `paretomerge fit --config configs/tiny.yaml`, fresh (empty cache: the suite is
built) and warm (suite cached), plus loading the cached suite, as medians, and the share of a warm run spent in the
ParetoFrontLogger (the seconds it reports at the end of fit: evaluating the front, drawing the figures). Prints a
Markdown table.

    python benchmarks/bench_main_job.py --fresh 1 --warm 3
    python benchmarks/bench_main_job.py --config configs/tiny20.yaml --fresh 0 --warm 1   # the 20-task job

Every run gets its own working directory for lightning_logs; fresh runs get an empty cache directory
($PARETOMERGE_CACHE). The build's own wall time is read from the suite's build_report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"


LOGGER_LINE = re.compile(r"ParetoFrontLogger: .* took ([0-9.]+) s, the figures ([0-9.]+) s")


def fit(cache: Path, config: Path = CONFIG) -> tuple[float, float | None]:
    """The run's wall seconds and the seconds the ParetoFrontLogger says it took (None if it said nothing)."""
    exe = Path(sys.executable).parent / "paretomerge"
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        done = subprocess.run([str(exe), "fit", "--config", str(config), "--trainer.enable_progress_bar", "false"],
                              cwd=work, env=dict(os.environ, PARETOMERGE_CACHE=str(cache)), check=True,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
    said = LOGGER_LINE.search(done.stdout + done.stderr)
    return seconds, None if said is None else float(said.group(1)) + float(said.group(2))


def load_seconds(cache: Path) -> float:
    code = ("import time; t = time.perf_counter(); from paretomerge.suites import TinySuite; "
            "s = TinySuite(progress=False); s.task_vectors(); s._split('test'); s._split('val'); "
            "print(time.perf_counter() - t)")
    # The import of torch and Lightning is timed separately: it is not the suite's cost.
    imports = "import time; t = time.perf_counter(); import paretomerge.suites; print(time.perf_counter() - t)"
    env = dict(os.environ, PARETOMERGE_CACHE=str(cache))
    total = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    imported = float(subprocess.run([sys.executable, "-c", imports], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    return total - imported


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh", type=int, default=1)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    fresh, builds, warm, loads, logger = [], [], [], [], []
    cache = Path(tempfile.mkdtemp(prefix="paretomerge-bench-"))
    try:
        for _ in range(args.fresh):
            shutil.rmtree(cache / "tiny", ignore_errors=True)
            fresh.append(fit(cache, args.config)[0])
            report = next((cache / "tiny").glob("*/build_report.json"))
            builds.append(json.loads(report.read_text())["build_seconds"])
        if not args.fresh:
            fit(cache, args.config)  # build once, untimed
        for _ in range(args.warm):
            seconds, in_logger = fit(cache, args.config)
            warm.append(seconds)
            if in_logger is not None:
                logger.append(in_logger / (seconds - in_logger))
            if args.config == CONFIG:
                loads.append(load_seconds(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} (n={len(values)})" if values else "not run"

    name = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    main_job = args.config == CONFIG
    print("| measure | median seconds | target |\n| --- | --- | --- |")
    print(f"| fresh `paretomerge fit --config {name}`, end to end | {cell(fresh)} | {'≤ 360' if main_job else ''} |")
    print(f"| of which building the suite | {cell(builds)} | {'≤ 180' if main_job else ''} |")
    print(f"| warm (suite cached) | {cell(warm)} | {'≤ 180' if main_job else ''} |")
    if main_job:
        print(f"| loading the cached suite (weights + test and validation images) | {cell(loads)} | ≤ 5 |")
    share = f"{statistics.median(logger):.3f} (n={len(logger)})" if logger else "not said"
    print(f"| warm: the ParetoFrontLogger's seconds / the rest of the run (a ratio) | {share} | ≤ 0.10 at K = 20 |")


if __name__ == "__main__":
    main()
