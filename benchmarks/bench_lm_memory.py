"""Peak memory of loading K fine-tuned Hugging Face causal LMs into `TaskVectors` (`causal_lm_task_vectors`) and of
one Pareto Merging training step on them, on random-weight Llama configs of growing size, against the arithmetic.

For each size, θ0 (a random ``LlamaForCausalLM``, vocab 32000, no download) and K fine-tunes (θ0 + 1e-3 × seeded
Gaussian noise) are written as sharded fp32 safetensors directories (``save_pretrained``) under a temporary directory
that is deleted afterwards. Each measurement runs in a fresh process that

1. imports torch, transformers (the Llama modeling code included) and paretomerge, and notes its resident memory
   (``VmRSS``): the baseline, subtracted from every peak;
2. loads θ0 and the K fine-tunes with ``causal_lm_task_vectors(dtype=θ0 dtype, tau_dtype=τ dtype)`` and notes its
   peak RSS so far (``VmHWM``, /proc/self/status): the loading peak (what a loading-only process would report,
   since nothing else has run yet) and the wall seconds of loading;
3. builds ``ParetoMerging(task_vectors=tv, rank=16, beta_div=0)``, notes its RSS, runs one forward + backward
   (``model.objective(model(batch, γ), γ, batch)["loss"].backward()``, γ = 1/K, 2 sequences × 64 tokens per task)
   and notes its peak RSS again: the loading+step peak.

Each measuring process runs one torch thread (``--threads``; on a shared 2-core machine two threads spun against
other jobs and made a step 10x slower) and one runs at a time (``--jobs``; --quick runs its two side by side).

The arithmetic: M = θ0's bytes (in its dtype); θ0 + τ = M + K × numel × τ's itemsize ((K+1)·M for fp32/fp32,
M + K·M/2 for fp32 θ0 and bf16 τ); `memory_plan` adds the largest shard (one fine-tune shard is open at a time).
A least-squares line of (peak − baseline) against the plan, over all sizes, per (K, dtypes, phase), gives slope and
intercept; Llama-3-8B and Llama-2-13B at K = 2 and 4 with bf16 θ0 and bf16 τ are extrapolated from it (printed as
extrapolations, not measurements).

Run:  .venv/bin/python benchmarks/bench_lm_memory.py                   (20M, 100M, 400M; K = 2, 4; ~21 min on 2 cores)
      .venv/bin/python benchmarks/bench_lm_memory.py --configs fp32/fp32 fp32/bf16 bf16/bf16   (~32 min; the results)
      .venv/bin/python benchmarks/bench_lm_memory.py --sizes 20M 100M --tasks 2
      .venv/bin/python benchmarks/bench_lm_memory.py --quick                      (a 4M model, K = 2; a test runs it)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIB = 2**20
GB = 1e9
VOCAB = 32000
SIZES = {  # name -> LlamaConfig fields (vocab 32000, untied embeddings, as in Llama 1/2)
    "4M": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4},
    "20M": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 5, "num_attention_heads": 4},
    "100M": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 7, "num_attention_heads": 12},
    "400M": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 26, "num_attention_heads": 16},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CONFIGS = ("fp32/fp32", "fp32/bf16", "bf16/bf16")  # θ0 dtype / τ dtype
# Extrapolation targets: parameters, and the largest safetensors shard the Hub's checkpoints have (Meta-Llama-3-8B:
# 4 shards, the largest about 5.0 GB; Llama-2-13b-hf: 3 shards, the largest about 9.9 GB) — one is open while loading.
TARGETS = {"Llama-3-8B": (8.03e9, 5.0e9), "Llama-2-13B": (13.0e9, 9.9e9)}
GPU_BYTES = 80e9
LIMIT_BYTES = 18 * 2**30  # no measurement process may need more than this


# ---------------------------------------------------------------------------------------------- child processes
_IMPORTS = """
import gc, json, sys, time
import torch, transformers
import transformers.models.llama.modeling_llama
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
import paretomerge
from paretomerge import ParetoMerging
from paretomerge.suites import causal_lm_task_vectors
def memory(field):  # VmRSS: resident now; VmHWM: this process's peak (ru_maxrss would count a forking parent's)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
gc.collect()
baseline = memory("VmRSS")
"""

_BASELINE_CHILD = _IMPORTS + """
print(json.dumps({"baseline_rss": baseline, "peak_rss": memory("VmHWM")}))
"""

_MEASURE_CHILD = _IMPORTS + """
root, k, theta0_dtype, tau_dtype, batch_size, seq_len = sys.argv[1:7]
k, batch_size, seq_len = int(k), int(batch_size), int(seq_len)
row = {"baseline_rss": baseline, "threads": torch.get_num_threads()}
start = time.perf_counter()
tv = causal_lm_task_vectors(f"{root}/pretrained", [f"{root}/task{i}" for i in range(k)], [f"t{i}" for i in range(k)],
                            dtype=getattr(torch, theta0_dtype), tau_dtype=getattr(torch, tau_dtype), progress=False)
row["load_seconds"] = time.perf_counter() - start
row["load_peak"], row["after_load_rss"], row["tau_bytes"] = memory("VmHWM"), memory("VmRSS"), tv.nbytes()
model = ParetoMerging(task_vectors=tv, rank=16, beta_div=0)
generator = torch.Generator().manual_seed(0)
vocab = tv.backbone.config.vocab_size
batch = {t: {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)} for t in tv.task_names}
gamma = torch.full((k,), 1.0 / k)
gc.collect()
row["before_step_rss"] = memory("VmRSS")
start = time.perf_counter()
loss = model.objective(model(batch, gamma), gamma, batch)["loss"]
loss.backward()
row["step_seconds"] = time.perf_counter() - start
row["step_peak"] = memory("VmHWM")
row["loss"] = float(loss)
row["grad_ok"] = bool(model.lambdas.grad is not None and torch.isfinite(model.lambdas.grad).all())
print(json.dumps(row))
"""


def _run_child(code: str, *args: object, threads: int = 1) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True,
                         cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


# ---------------------------------------------------------------------------------------------- models on disk
def llama_config(size: str):
    from transformers import LlamaConfig

    fields = SIZES[size]
    return LlamaConfig(vocab_size=VOCAB, num_key_value_heads=fields["num_attention_heads"], tie_word_embeddings=False,
                       max_position_embeddings=2048, **fields)


def parameter_count(size: str) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(size)).parameters())


def write_family(root: Path, size: str, tasks: int, shard: str) -> float:
    """θ0 and ``tasks`` fine-tunes (θ0 + 1e-3 × seeded noise) as fp32 ``save_pretrained`` directories; seconds."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).eval().requires_grad_(False)
    model.save_pretrained(root / "pretrained", max_shard_size=shard)
    theta0 = {n: p.clone() for n, p in model.named_parameters()}
    for k in range(tasks):
        generator = torch.Generator().manual_seed(1000 + k)
        for name, param in model.named_parameters():
            param.copy_(theta0[name]).add_(torch.randn(param.shape, generator=generator), alpha=1e-3)
        model.save_pretrained(root / f"task{k}", max_shard_size=shard)
    del model, theta0
    gc.collect()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- measuring
def plan_row(root: Path, size: str, params: int, tasks: int, config: str) -> dict:
    """The row's arithmetic (`memory_plan`, from the headers), or why it is skipped."""
    import torch

    from paretomerge.suites.hf_lm import memory_plan

    theta0_dtype, tau_dtype = (getattr(torch, DTYPES[d]) for d in config.split("/"))
    plan = memory_plan(root / "pretrained", tasks, theta0_dtype, tau_dtype)
    row = {"size": size, "params": params, "tasks": tasks, "config": config, "model_bytes": plan["theta0_bytes"],
           "arithmetic_bytes": plan["theta0_bytes"] + plan["tau_bytes"], **plan}
    # θ0 + τ + a shard, then the step's merged weights and their gradients (about 3 M): skip what cannot fit.
    need = plan["total_bytes"] + 4 * params * 4
    if need > LIMIT_BYTES or need > _available_bytes() - 2 * 2**30:
        row["skipped"] = (f"needs about {need / 2**30:.1f} GiB; {_available_bytes() / 2**30:.1f} GiB available, "
                          f"limit {LIMIT_BYTES / 2**30:.0f} GiB")
    return row


def measure(root: Path, row: dict, batch: int, seq_len: int, threads: int) -> dict:
    """Fill ``row`` from a fresh process that loads and steps (see the module's docstring)."""
    if "skipped" in row:
        return row
    theta0_dtype, tau_dtype = (DTYPES[d] for d in row["config"].split("/"))
    start = time.perf_counter()
    try:
        row.update(_run_child(_MEASURE_CHILD, root, row["tasks"], theta0_dtype, tau_dtype, batch, seq_len,
                              threads=threads))
    except subprocess.CalledProcessError as err:  # killed for memory, or an error: say so in the table
        row["skipped"] = f"the process failed ({err.returncode}): {err.stderr.strip().splitlines()[-1:]}"
        return row
    row["load_above"] = row["load_peak"] - row["baseline_rss"]
    row["step_above"] = row["step_peak"] - row["baseline_rss"]
    row["step_extra"] = row["step_peak"] - row["before_step_rss"]
    row["process_seconds"] = time.perf_counter() - start
    print(f"[measured {row['size']} K={row['tasks']} {row['config']}: {row['process_seconds']:.0f} s]", file=sys.stderr,
          flush=True)
    return row


def fit(rows: list[dict], phase: str) -> dict[tuple[int, str], tuple[float, float, int]]:
    """(K, dtypes) -> (slope, intercept bytes, points) of the least-squares line (peak − baseline) = a·plan + b."""
    lines = {}
    for key in dict.fromkeys((r["tasks"], r["config"]) for r in rows if "skipped" not in r):
        points = [(r["total_bytes"], r[phase]) for r in rows if (r["tasks"], r["config"]) == key and phase in r]
        if len({x for x, _ in points}) < 2:
            continue
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        lines[key] = (slope, my - slope * mx, n)
    return lines


def extrapolate(lines: dict, tasks: list[int]) -> list[dict]:
    """Llama-3-8B and Llama-2-13B with bf16 θ0 and bf16 τ, from the bf16/bf16 lines (else fp32/bf16's)."""
    out = []
    for name, (params, shard) in TARGETS.items():
        for k in tasks:
            plan = params * 2 + k * params * 2 + shard
            for config in ("bf16/bf16", "fp32/bf16"):
                if (k, config) in lines["load_above"] and (k, config) in lines["step_above"]:
                    load, step = lines["load_above"][(k, config)], lines["step_above"][(k, config)]
                    out.append({"model": name, "params": params, "tasks": k, "plan": plan, "from": config,
                                "load": load[0] * plan + load[1], "step": step[0] * plan + step[1],
                                "model_bytes": params * 2})
                    break
    return out


# ---------------------------------------------------------------------------------------------- printing
def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def print_report(rows: list[dict], lines: dict, extrapolated: list[dict], baseline: dict, write_seconds: dict) -> None:
    peak = "" if baseline["peak_rss"] is None else f" (its import-time peak: {_mib(baseline['peak_rss'])} MiB)"
    print(f"Baseline: a fresh process that only imported torch, transformers (Llama code) and paretomerge holds "
          f"{_mib(baseline['baseline_rss'])} MiB resident{peak}; every figure below is a peak minus its own "
          "process's baseline (its RSS after the same imports).\n")
    print("| params | K | θ0/τ | M MiB | θ0+τ MiB | plan MiB | load − base MiB | load / plan | load+step − base MiB "
          "| step extra / M | load s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        head = (f"| {r['size']} ({r['params']:,}) | {r['tasks']} | {r['config']} | {_mib(r['model_bytes'])} | "
                f"{_mib(r['arithmetic_bytes'])} | {_mib(r['total_bytes'])} |")
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']} | | | | |")
            continue
        print(f"{head} {_mib(r['load_above'])} | {r['load_above'] / r['total_bytes']:.2f} | {_mib(r['step_above'])} "
              f"| {r['step_extra'] / r['model_bytes']:.2f} | {r['load_seconds']:.1f} |")
    print("\nM: θ0's bytes in its dtype. θ0+τ: M + K × numel × τ's itemsize ((K+1)·M for fp32/fp32, M + K·M/2 for "
          "fp32/bf16). plan: memory_plan's total_bytes (θ0 + τ + the largest shard). step extra: the step's peak minus "
          "the RSS just before it (ParetoMerging built). load s: wall seconds of causal_lm_task_vectors (noise-prone: "
          "a shared machine). Writing the directories took " + ", ".join(
              f"{size}: {seconds:.0f} s" for size, seconds in write_seconds.items()) + ".")
    if lines["load_above"]:
        print("\nLeast squares over the sizes, (peak − baseline) = a × plan + b:\n")
        print("| K | θ0/τ | phase | a (slope) | b (intercept) MiB | sizes |\n|---:|---|---|---:|---:|---:|")
        for phase, label in (("load_above", "load"), ("step_above", "load+step")):
            for (k, config), (slope, intercept, n) in lines[phase].items():
                print(f"| {k} | {config} | {label} | {slope:.3f} | {_mib(intercept)} | {n} |")
    if extrapolated:
        print("\nEXTRAPOLATION, NOT MEASURED: bf16 θ0 and bf16 τ (as a GPU run keeps them), plan = 2·N + K·2·N + the "
              "largest shard, through the measured line of the configuration named (a·plan + b); the step's extra "
              "at B = 2 × 64 tokens per task, as on this CPU:\n")
        print("| model | params | K | plan GB | line from | load GB (extrapolated) | load+step GB (extrapolated) "
              f"| fits {GPU_BYTES / GB:.0f} GB? |\n|---|---:|---:|---:|---|---:|---:|---|")
        for e in extrapolated:
            fits = "yes" if e["step"] <= GPU_BYTES else "no"
            print(f"| {e['model']} | {e['params'] / 1e9:.2f}e9 | {e['tasks']} | {e['plan'] / GB:.1f} | {e['from']} | "
                  f"{e['load'] / GB:.1f} | {e['step'] / GB:.1f} | {fits} |")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["20M", "100M", "400M"], choices=list(SIZES))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--configs", nargs="+", default=["fp32/fp32", "fp32/bf16"], choices=list(CONFIGS),
                        help="θ0 dtype / τ dtype; bf16/bf16 (what a GPU run holds) adds a third of the time")
    parser.add_argument("--batch", type=int, default=2, help="sequences per task in the step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--shard", default="200MB", help="save_pretrained's max_shard_size")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary model directories go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measuring process (OMP_NUM_THREADS; "
                        "one: on a shared 2-core machine two spin against other jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="measurement processes at a time (peaks are per process; "
                        "wall times and free memory are shared)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object per row")
    parser.add_argument("--quick", action="store_true", help="the 4M model, K = 2, fp32 and bf16 τ (a test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.tasks, args.configs, args.shard = ["4M"], [2], ["fp32/fp32", "fp32/bf16"], "5MB"
        args.jobs = max(args.jobs, 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pool = ThreadPoolExecutor(max_workers=args.jobs)  # threads that wait on child processes
    # A process that only imports (its RSS is what each measuring process subtracts, measured there again); --quick
    # takes it from the measuring processes alone.
    baseline = None if args.quick else pool.submit(_run_child, _BASELINE_CHILD)
    rows, write_seconds = [], {}
    try:
        for size in args.sizes:
            params = parameter_count(size)
            root = Path(tempfile.mkdtemp(prefix=f"bench_lm_memory_{size}_", dir=args.tmp))
            try:
                write_seconds[size] = write_family(root, size, max(args.tasks), args.shard)
                print(f"[wrote {size}: {write_seconds[size]:.0f} s]", file=sys.stderr, flush=True)
                planned = [plan_row(root, size, params, k, c) for k in args.tasks for c in args.configs]
                rows += list(pool.map(lambda row, root=root: measure(root, row, args.batch, args.seq_len, args.threads),
                                     planned))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        if baseline is None:
            measured = [r["baseline_rss"] for r in rows if "baseline_rss" in r]
            baseline = {"baseline_rss": min(measured), "peak_rss": None}
        else:
            baseline = baseline.result()
    finally:
        pool.shutdown()
    lines = {phase: fit(rows, phase) for phase in ("load_above", "step_above")}
    extrapolated = extrapolate(lines, args.tasks)
    print_report(rows, lines, extrapolated, baseline, write_seconds)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return {"baseline": baseline, "rows": rows, "lines": lines, "extrapolated": extrapolated}


if __name__ == "__main__":
    main()
