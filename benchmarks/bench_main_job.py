"""Wall time of the main job, `paretomerge fit --config configs/tiny.yaml`, fresh (empty cache: the suite is
built) and warm (suite cached), plus loading the cached suite, as medians. Prints a Markdown table.

    python benchmarks/bench_main_job.py --fresh 1 --warm 3

Every run gets its own working directory for lightning_logs; fresh runs get an empty cache directory
($PARETOMERGE_CACHE). The build's own wall time is read from the suite's build_report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"


def fit(cache: Path) -> float:
    exe = Path(sys.executable).parent / "paretomerge"
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        subprocess.run([str(exe), "fit", "--config", str(CONFIG), "--trainer.enable_progress_bar", "false"],
                       cwd=work, env=dict(os.environ, PARETOMERGE_CACHE=str(cache)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


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
    args = parser.parse_args()
    fresh, builds, warm, loads = [], [], [], []
    cache = Path(tempfile.mkdtemp(prefix="paretomerge-bench-"))
    try:
        for _ in range(args.fresh):
            shutil.rmtree(cache / "tiny", ignore_errors=True)
            fresh.append(fit(cache))
            report = next((cache / "tiny").glob("*/build_report.json"))
            builds.append(json.loads(report.read_text())["build_seconds"])
        if not args.fresh:
            fit(cache)  # build once, untimed
        for _ in range(args.warm):
            warm.append(fit(cache))
            loads.append(load_seconds(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} (n={len(values)})" if values else "not run"

    print("| measure | median seconds | target |\n| --- | --- | --- |")
    print(f"| fresh `paretomerge fit --config configs/tiny.yaml`, end to end | {cell(fresh)} | ≤ 360 |")
    print(f"| of which building the suite | {cell(builds)} | ≤ 180 |")
    print(f"| warm (suite cached) | {cell(warm)} | ≤ 180 |")
    print(f"| loading the cached suite (weights + test and validation images) | {cell(loads)} | ≤ 5 |")


if __name__ == "__main__":
    main()
