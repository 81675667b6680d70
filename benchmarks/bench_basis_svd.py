"""The preference basis's truncated SVD: `kernels.basis.truncated_svd` (eigh of the small Gram matrix) against a full
`torch.linalg.svd`, on the matrix shapes of a ViT-B/32 block at K = 8, with a decaying spectrum as fine-tuning updates
have (singular values from 1 down to 1e-3, log-spaced). Times alternate between the two, median of ``--repeats``.

    python benchmarks/bench_basis_svd.py [--tasks 8] [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paretomerge.kernels.basis import truncated_svd

SHAPES = {"attn.in_proj [2304, 768]": (2304, 768), "attn.out_proj [768, 768]": (768, 768),
          "mlp.c_fc [3072, 768]": (3072, 768), "mlp.c_proj [768, 3072]": (768, 3072)}


def decaying(num_tasks: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(num_tasks, m, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(num_tasks, n, k, generator=generator))[0]
    return (u * torch.logspace(0, -3, k)) @ v.mT * 1e-2


def full_svd(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` approximation from a full SVD, ``[K, m, n]`` (the reference)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"K = {args.tasks}, rank {args.rank}, torch threads {torch.get_num_threads()}")
    print("| matrix | full SVD (s) | truncated_svd (s) | ratio | relative difference |\n|---|---:|---:|---:|---:|")
    for label, (m, n) in SHAPES.items():
        tau = decaying(args.tasks, m, n)
        times: dict[str, list[float]] = {"svd": [], "ours": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            reference = full_svd(tau, args.rank)
            times["svd"].append(time.perf_counter() - start)
            start = time.perf_counter()
            left, right = truncated_svd(tau, args.rank)
            times["ours"].append(time.perf_counter() - start)
        ours = torch.einsum("mkr,nkr->kmn", left, right)
        difference = float((ours - reference).norm() / reference.norm())
        svd_s, ours_s = statistics.median(times["svd"]), statistics.median(times["ours"])
        print(f"| {label} | {svd_s:.2f} | {ours_s:.2f} | {svd_s / ours_s:.1f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
