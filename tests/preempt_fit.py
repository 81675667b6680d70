"""A fit of the fast TinySuite that a test can kill, for tests/test_preemption.py.

    python tests/preempt_fit.py OUT CACHE [--max-steps N] [--every N] [--hold-at STEP] [--hold-rank R] [--resume]
                                          [--devices 2]

Checkpoints every ``--every`` steps (and ``last.ckpt``) into ``OUT/ckpt``, validates at the last step, where the
front logger evaluates its front. ``--hold-at STEP`` writes ``OUT/holding`` when step STEP is about to start and
then waits for a signal. With ``--devices 2`` it is a 2-process DDP fit (gloo; Lightning's launcher re-runs this
script for rank 1), and only rank ``--hold-rank`` holds, writing its pid to ``OUT/holding-rank<R>``. ``--resume``
continues from ``OUT/ckpt/last.ckpt``. At the end rank 0 writes ``OUT/final.pt``: the trainable state and the front
the logger evaluated last.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from paretomerge import ParetoMerging
from paretomerge.callbacks import ParetoFrontLogger
from paretomerge.modules.checkpoint import AtomicCheckpointIO
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite


class HoldAt(L.Callback):
    """At ``step``, say so in a file and wait for the test's signal: SIGKILL ends the process here; after SIGTERM the
    step goes on, and Lightning stops at its end."""

    def __init__(self, step: int | None, marker: Path, rank: int = 0) -> None:
        self.step, self.marker, self.rank = step, marker, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if trainer.world_size > 1:
                (self.marker.parent / f"holding-rank{self.rank}").write_text(str(os.getpid()))
            self.marker.write_text(str(batch_idx))
            while not trainer.received_sigterm:
                time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("cache")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--hold-rank", type=int, default=0)
    args = parser.parse_args()
    suite = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=args.cache)
    model = ParetoMerging(rank=4)
    front = ParetoFrontLogger(progress=False, baselines=False)
    checkpoints = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.every, save_top_k=-1,
                                  save_last=True, save_on_exception=True)
    trainer = L.Trainer(max_steps=args.max_steps, val_check_interval=args.max_steps, check_val_every_n_epoch=None,
                        limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, logger=TensorBoardLogger(args.out, name="logs"),
                        callbacks=[checkpoints, front, HoldAt(args.hold_at, args.out / "holding", args.hold_rank)],
                        plugins=[AtomicCheckpointIO()], default_root_dir=args.out, devices=args.devices,
                        strategy=DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto")
    trainer.fit(model, datamodule=suite, ckpt_path=str(args.out / "ckpt" / "last.ckpt") if args.resume else None)
    if trainer.global_rank == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "front": front.front,
                    "step": trainer.global_step}, args.out / "final.pt")


if __name__ == "__main__":
    main()
