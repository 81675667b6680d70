"""Size of a ParetoMerging `.ckpt` and export against θ0 plus heads, for several K, on a random-weight open_clip
ViT-B/32 visual tower (no download), for the paper's configuration and for ours.

The paper's `.ckpt` never holds the stacked task vectors, so its ratio stays near 1 whatever K is. Ours
(preference-conditioned coefficients) needs τ for ``at(γ)``, so its `.ckpt` and export also hold them: about (1 + K)×
in τ's dtype, (1 + K/2)× with bf16 task vectors (``TaskVectors.from_state_dicts(..., dtype=torch.bfloat16)``-style:
here τ is cast after loading). The compact export (`paretomerge export`: base, preference tensor, heads, config, and
τ for ours; no optimizer state) is compared with one backbone.

Run:  .venv/bin/python benchmarks/bench_checkpoint_size.py            (K = 2 and 8, both configurations)
      .venv/bin/python benchmarks/bench_checkpoint_size.py --tasks 2  (one K)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paretomerge import ModuleSpec, ParetoMerging, TaskVectors, export_pareto_set
from paretomerge.modules.pareto_merging import PAPER_CONFIGURATION

MIB = 2**20


CONFIGURATIONS = {"paper": (PAPER_CONFIGURATION, None), "ours": ({}, None), "ours, bf16 τ": ({}, torch.bfloat16)}


def measure(num_tasks: int, rank: int, model_name: str, options: dict,
            tau_dtype: torch.dtype | None) -> tuple[float, float, float, float, float]:
    torch.manual_seed(0)
    spec = ModuleSpec("open_clip:create_model", {"model_name": model_name, "pretrained": None}, attr="visual")
    pretrained = spec.build()
    finetuned = [{k: v + 1e-3 * torch.randn_like(v) for k, v in pretrained.state_dict().items()}
                 for _ in range(num_tasks)]
    names = [f"task{k}" for k in range(num_tasks)]
    heads = {n: nn.Linear(pretrained.output_dim, 10) for n in names}
    tv = TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)
    del finetuned
    if tau_dtype is not None:
        tv = tv.with_tau({n: t.to(tau_dtype) for n, t in tv.tau.items()})
    size = pretrained.image_size[0] if isinstance(pretrained.image_size, tuple) else pretrained.image_size
    loader = CombinedLoader(
        {n: DataLoader(TensorDataset(torch.randn(1, 3, size, size)), batch_size=1) for n in names}, "max_size_cycle"
    )
    model = ParetoMerging(task_vectors=tv, rank=rank, **options)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)  # one step, so the optimizer state exists
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ckpt"
        trainer.save_checkpoint(path)
        ckpt_bytes = path.stat().st_size
        export_bytes = export_pareto_set(model, Path(tmp) / "pareto_set.safetensors").stat().st_size
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    base = backbone + sum(t.numel() * t.element_size() for t in tv.heads.state_dict().values())
    return ckpt_bytes / MIB, base / MIB, tv.nbytes() / MIB, export_bytes / MIB, backbone / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()
    print(f"open_clip {args.model} visual tower (random weights), rank {args.rank}, after one training step\n")
    print("| configuration | K | .ckpt MiB | θ0 + heads MiB | ratio | τ MiB | export MiB | one backbone MiB "
          "| export / backbone |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in args.tasks:
        for label, (options, dtype) in CONFIGURATIONS.items():
            ckpt, base, tau, export, backbone = measure(k, args.rank, args.model, options, dtype)
            print(f"| {label} | {k} | {ckpt:.1f} | {base:.1f} | {ckpt / base:.3f} | {tau:.0f} | {export:.1f} "
                  f"| {backbone:.1f} | {export / backbone:.3f} |", flush=True)


if __name__ == "__main__":
    main()
