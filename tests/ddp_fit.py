"""A 2-process DDP fit on CPU (gloo) of the fast TinySuite, and of a small TinyLM suite, for tests/test_ddp.py (a
script: Lightning's DDP launcher re-runs it once per extra rank, which a pytest process cannot be).

    python tests/ddp_fit.py OUT CACHE pareto,adamerging,tinylm [STEPS]

The methods are fitted one after the other in one 2-process group. For each, every rank writes
``OUT/<method>/rank<r>.json`` (what it saw and sent) and ``OUT/<method>/rank<r>.pt`` (its trainable state); every
build of the suite appends the building process's pid to ``OUT/<method>/builds.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from paretomerge import AdaMerging, ParetoMerging
from paretomerge.callbacks import FitSummary, MAPBaseline, ParetoFrontLogger
from paretomerge.modules.ddp import TimedDDPStrategy
from paretomerge.suites import FAST_TASKS, TinyLMSuite, TinySuite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root, for tests.*
from tests.conftest import SMALL_RECIPE  # noqa: E402  (DDP's mechanics need no suite in CLIP's regime)

# A TinyLM recipe that builds in seconds (DDP's mechanics need no suite in the regime), and its suite's options.
SMALL_LM_RECIPE = {"pretrain_docs": 256, "finetune_docs": 128, "test_docs": 32, "pretrain_steps": 30,
                   "finetune_steps": 10}
SMALL_LM = {"recipe": SMALL_LM_RECIPE, "train_docs": 64, "val_docs": 16, "batch_size": 4, "progress": False}


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


class Recorder(L.Callback):
    """Per rank: the images of every training batch, γ of every step, and what DDP wraps and sends."""

    def __init__(self, out: Path, traffic: dict) -> None:
        self.out, self.traffic = out, traffic
        self.images: dict[str, list[str]] = {}
        self.batches: list[dict[str, str]] = []
        self.gammas: list[list[float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        wrapped = trainer.strategy.model  # the DistributedDataParallel wrapper (unwrapped again before fit ends)
        wrapped.register_comm_hook(self.traffic, counting_allreduce)
        self.ddp = {
            "ddp_class": type(wrapped).__name__,
            "ddp_parameters": sorted(n.removeprefix("module.") for n, p in wrapped.named_parameters()
                                     if p.requires_grad),
            "ddp_buffers": sum(b.numel() for b in wrapped.buffers()),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images = {task: value["input_ids"] if isinstance(value, Mapping) else value[0] for task, value in batch.items()}
        self.batches.append({task: digest(x) for task, x in images.items()})
        for task, x in images.items():
            self.images.setdefault(task, []).extend(digest(image) for image in x)
        self.gammas.append(pl_module.training_preference().tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        trainable = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(trainable, self.out / f"rank{rank}.pt")
        tv = pl_module.task_vectors
        basis = pl_module.preference_basis() if getattr(pl_module, "preference_conditioned", False) else None
        record = {
            "basis": None if basis is None else digest(torch.cat([t.flatten().double() for t in basis.tensors()])),
            "rank": rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            **self.ddp,
            "trainable_parameters": sum(p.numel() for p in trainable.values()),
            "frozen_parameters": sum(v.numel() for v in tv.theta0.values()) + sum(v.numel() for v in tv.tau.values())
            + sum(p.numel() for p in tv.heads.parameters()),
            "gradient_bytes": self.traffic["bytes"],
            "gradient_buckets": self.traffic["buckets"],
            "batches": self.batches,
            "images": self.images,
            "gammas": self.gammas,
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))


def counting_allreduce(traffic, bucket):  # no annotations: DDP checks them against real types
    """DDP's default gradient all-reduce, counting the bytes each bucket puts on the wire."""
    buffer = bucket.buffer()
    traffic["bytes"] += buffer.numel() * buffer.element_size()
    traffic["buckets"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def fit(out: Path, method: str, steps: int, suite: TinySuite | TinyLMSuite) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = {"pareto": lambda: ParetoMerging(rank=4, seed=0), "adamerging": AdaMerging,
             "tinylm": lambda: ParetoMerging(rank=2, seed=0, beta_div=0.0)}[method]()
    traffic = {"bytes": 0, "buckets": 0}
    # The module registers no buffers (θ0, τ and the heads live outside it), so DDP has none to broadcast. The
    # strategy is configs/ddp.yaml's: its training steps are bounded by step_timeout (3 minutes) and nothing here
    # waits that long, not even rank 1 while rank 0 alone runs MAP, the front and the summary.
    strategy = TimedDDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, val_check_interval=steps // 2,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(str(out), name="logs", default_hp_metric=False), log_every_n_steps=1,
        callbacks=[Recorder(out, traffic), ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True),
                   MAPBaseline(budget=12, real_samples=2, generations=10), ParetoFrontLogger(progress=False),
                   FitSummary()],
    )
    trainer.fit(model, datamodule=suite)


def main() -> None:
    out, cache_dir, methods = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    torch.set_num_threads(1)
    build = TinySuite._build
    current = {"out": out}

    def counted_build(self):
        with open(current["out"] / "builds.txt", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return build(self)

    TinySuite._build = counted_build
    if os.environ.get("LOCAL_RANK") == "1":  # a device whose SVD gives other bits: it must train with rank 0's basis
        import paretomerge.kernels.basis as basis_module

        svd = basis_module.truncated_svd
        basis_module.truncated_svd = lambda tau, rank: tuple(1.5 * f if i == 0 else f
                                                             for i, f in enumerate(svd(tau, rank)))
    # One 2-process group for every method: the first fit launches rank 1 (which runs this script, so the same fits),
    # and the next fits join the process group that is already there.
    for method in methods:
        current["out"] = out / method
        if method == "tinylm":
            suite = TinyLMSuite(tasks=["svo", "sov", "vso"], cache_dir=cache_dir, **SMALL_LM)
        else:
            suite = TinySuite(tasks=list(FAST_TASKS), recipe=SMALL_RECIPE, test_images=128, val_images=64,
                              batch_size=8, progress=False, cache_dir=cache_dir)
        fit(out / method, method, steps, suite)


if __name__ == "__main__":
    main()
