"""Peak memory while K fine-tuned open_clip visual towers are loaded into `TaskVectors` (`clip.load_task_vectors`).

The K checkpoints (random ViT-B/32 weights, no download) are written to a temporary directory first; a fresh process
imports paretomerge, notes its resident memory (the baseline: Python, torch and open_clip's code), builds θ0, loads
the K checkpoints, and reports its peak RSS (``ru_maxrss``) above that baseline. The target is
``peak − baseline ≤ (K+1) × model bytes × 1.3``: θ0 and the K stacked task vectors are (K+1) models, and streaming
keeps only one fine-tuned checkpoint in memory at a time. ``--eager`` reads all K first (what a list of state dicts
costs), for comparison.

Run:  .venv/bin/python benchmarks/bench_load_memory.py                     (K = 8, safetensors and .pt; ~2 minutes)
      .venv/bin/python benchmarks/bench_load_memory.py --formats safetensors --json   (one line per row, for tests)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MIB = 2**20
SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "hf": ".safetensors"}


def _spec(model: str):
    from paretomerge import ModuleSpec

    return ModuleSpec("open_clip:create_model", {"model_name": model, "pretrained": None}, attr="visual")


def write_checkpoints(directory: Path, tasks: int, model: str, fmt: str) -> None:
    from safetensors.torch import save_file

    from paretomerge.suites.importers import open_clip_to_hf

    torch.manual_seed(0)
    theta0 = _spec(model).build().state_dict()
    for k in range(tasks):
        state = {n: (v + 1e-3 * torch.randn_like(v)).contiguous() for n, v in theta0.items()}
        path = directory / f"task{k}{SUFFIX[fmt]}"
        if fmt == "pt":
            torch.save(state, path)
        else:
            save_file(open_clip_to_hf(state) if fmt == "hf" else state, str(path))
        del state


def _resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def child(directory: Path, tasks: int, model: str, fmt: str, eager: bool) -> dict:
    """Runs in a fresh process: build θ0, load the K checkpoints, report peak RSS above the imports' baseline."""
    import open_clip  # noqa: F401  (its import is part of the baseline)
    from torch import nn

    from paretomerge.suites.clip import load_task_vectors
    from paretomerge.suites.importers import read_visual_state_dict

    spec = _spec(model)
    baseline = _resident_bytes()
    torch.manual_seed(0)
    visual = spec.build()
    model_bytes = sum(t.numel() * t.element_size() for t in visual.state_dict().values())
    paths = {f"task{k}": directory / f"task{k}{SUFFIX[fmt]}" for k in range(tasks)}
    heads = {t: nn.Linear(visual.output_dim, 10) for t in paths}
    if eager:  # every state dict in memory before the stacks are built
        from paretomerge import TaskVectors

        theta0 = visual.state_dict()
        states = [read_visual_state_dict(p, theta0) for p in paths.values()]
        tv = TaskVectors.from_state_dicts(visual, states, list(paths), heads, backbone_spec=spec, copy_backbone=False)
    else:
        tv = load_task_vectors(visual, paths, heads, spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tasks": tasks, "model": model, "format": fmt, "eager": eager, "model_bytes": model_bytes,
            "baseline_rss": baseline, "peak_rss": peak, "peak_above_baseline": peak - baseline,
            "tau_bytes": tv.nbytes()}


def measure(tasks: int, model: str, fmt: str, eager: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(Path(tmp), tasks, model, fmt)
        command = [sys.executable, __file__, "--child", tmp, "--tasks", str(tasks), "--model", model,
                   "--formats", fmt] + (["--eager"] if eager else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["bound"] = (tasks + 1) * row["model_bytes"] * 1.3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--formats", nargs="+", default=["safetensors", "pt", "hf"], choices=sorted(SUFFIX))
    parser.add_argument("--eager", action="store_true", help="also measure loading all K state dicts first")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.tasks, args.model, args.formats[0], args.eager)))
        return
    rows = [measure(args.tasks, args.model, fmt) for fmt in args.formats]
    if args.eager:
        rows.append(measure(args.tasks, args.model, args.formats[0], eager=True))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"open_clip {args.model} visual tower, random weights, K = {args.tasks}: a fresh process builds θ0 and loads "
          "the K checkpoints; baseline = its RSS after the imports\n")
    print("| format | loading | model MiB | baseline MiB | peak RSS MiB | peak − baseline MiB "
          "| bound (K+1)×model×1.3 MiB | (peak − baseline) / ((K+1)×model) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        unit = (row["tasks"] + 1) * row["model_bytes"]
        print(f"| {row['format']} | {'all K first' if row['eager'] else 'streamed'} | {row['model_bytes'] / MIB:.0f} | "
              f"{row['baseline_rss'] / MIB:.0f} | {row['peak_rss'] / MIB:.0f} | {row['peak_above_baseline'] / MIB:.0f} "
              f"| {row['bound'] / MIB:.0f} | {row['peak_above_baseline'] / unit:.2f} |")


if __name__ == "__main__":
    main()
