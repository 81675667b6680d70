"""What a reader should expect to reproduce, and where machines part (issue 34): the preference basis's int8 codes and
the main job's figures under other CPU code paths and thread counts, each in its own process on this machine.

Machines differ in their vector instructions (AVX-512, AVX2, none), which change the order of sums inside BLAS and
torch's kernels, and in their thread counts. Both can be chosen on one machine before torch starts:
ATEN_CPU_CAPABILITY (torch's own kernels), MKL_ENABLE_INSTRUCTIONS (BLAS), ONEDNN_MAX_CPU_ISA (oneDNN), and
OMP_NUM_THREADS / MKL_NUM_THREADS. A variant this CPU cannot run falls back to what it can.

    python benchmarks/bench_reproducible.py --part basis    # int8 codes of the 8-task TinySuite's basis (a minute)
    python benchmarks/bench_reproducible.py --part fit      # the main job under each variant (~1.5 min each here)

`--part basis` also takes the task vectors in float64 (the same numbers): the codes must not depend on it either.
Every run must be alone on the CPU: do not run another torch process beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "this CPU (AVX-512), 2 threads": {},
    "AVX-512, 1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "AVX2 everywhere": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "no AVX (SSE4.2)": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                        "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def basis_codes(out: str, dtype: str) -> None:
    """In a child: the TinySuite's (seed 0, cached) basis at rank 16, its int8 codes saved to ``out``."""
    import torch

    from paretomerge.kernels.basis import PreferenceBasis
    from paretomerge.suites import TinySuite

    tv = TinySuite(seed=0, progress=False).task_vectors()
    tau = {n: t.to(getattr(torch, dtype)) for n, t in tv.tau.items()}
    basis = PreferenceBasis.truncated(tau, 16)
    codes = {n: torch.cat([left.codes.flatten(), right.codes.flatten()]) for n, (left, right) in basis.factors.items()}
    torch.save({"codes": codes, "capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads()}, out)


def run_basis() -> list[str]:
    import torch

    rows, reference = [], None
    cases = [(name, env, "float32") for name, env in VARIANTS.items()] + [
        ("this CPU, τ given in float64", {}, "float64")]
    with tempfile.TemporaryDirectory() as work:
        for i, (name, env, dtype) in enumerate(cases):
            out = str(Path(work) / f"{i}.pt")
            subprocess.run([sys.executable, __file__, "--child-basis", out, dtype], check=True,
                           env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
            got = torch.load(out, weights_only=True)
            codes = torch.cat([got["codes"][n] for n in sorted(got["codes"])])
            if reference is None:
                reference = codes
            differ = int((codes != reference).sum())
            rows.append(f"| {name} | {got['capability']} | {got['threads']} | {dtype} | {codes.numel():,} | "
                        f"{differ:,} |")
    return ["| variant | torch's CPU capability | threads | τ | int8 codes | differing from the first |",
            "|---|---|---:|---|---:|---:|", *rows]


SUMMARY_MEAN = re.compile(r"^mean\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)",
                          re.M)
SUMMARY_HV = re.compile(r"non-dominated; hypervolume ([\d.]+)")


def run_fit(keep: str | None = None, variants: list[str] | None = None) -> list[str]:
    exe = Path(sys.executable).parent / "paretomerge"
    rows, values = [], []
    for name, env in VARIANTS.items():
        if variants and not any(v.lower() in name.lower() for v in variants):
            continue
        with tempfile.TemporaryDirectory() as work:
            done = subprocess.run([str(exe), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                   "--trainer.enable_progress_bar", "false"], cwd=work, capture_output=True,
                                  text=True, env={**os.environ, **env})
        if done.returncode != 0:
            raise RuntimeError(f"{name}: the fit failed\n{done.stderr[-3000:]}")
        if keep:  # each variant's whole printout, for the README's table
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"{len(rows)}.txt").write_text(f"{name}\n{done.stdout}")
        mean, hv = SUMMARY_MEAN.search(done.stdout), SUMMARY_HV.search(done.stdout)
        equal, one_hot, rise = float(mean.group(5)), float(mean.group(6)), float(mean.group(7))
        values.append((equal, one_hot, float(hv.group(1))))
        rows.append(f"| {name} | {equal:.1f} | {one_hot:.1f} | {rise:+.1f} | {float(hv.group(1)):.4f} |")
        print(rows[-1], flush=True)
    spread = [max(v[i] for v in values) - min(v[i] for v in values) for i in range(3)]
    rows.append(f"| spread (max − min) | {spread[0]:.1f} | {spread[1]:.1f} | | {spread[2]:.4f} |")
    return ["| variant | ours, equal (%) | one-hot mean (%) | one-hot − equal | hypervolume |",
            "|---|---:|---:|---:|---:|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("basis", "fit"), default="basis")
    parser.add_argument("--keep", metavar="DIR", help="with --part fit: write each variant's printout there")
    parser.add_argument("--variants", nargs="+", help="with --part fit: only the variants whose names contain these")
    parser.add_argument("--child-basis", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_basis:
        basis_codes(*args.child_basis)
        return
    print("\n".join(run_basis() if args.part == "basis" else run_fit(args.keep, args.variants)))
    print(json.dumps({"variants": VARIANTS}))


if __name__ == "__main__":
    main()
