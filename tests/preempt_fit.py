"""A fit of the fast TinySuite that a test can stop, kill or hang, for tests/test_preemption.py.

    python tests/preempt_fit.py OUT CACHE [--max-steps N] [--every N] [--val-every N] [--resume] [--devices 2]
                                          [--hold-at STEP] [--hold-rank R] [--hold-in-front STEP] [--slow S]
                                          [--step-timeout S] [--then OUT2]

Checkpoints every ``--every`` steps (and ``last.ckpt``) into ``OUT/ckpt``, validates every ``--val-every`` steps (by
default at the last step only), where the front logger evaluates its front. ``--hold-at STEP`` writes ``OUT/holding``
when step STEP is about to start and then waits for a signal. ``--hold-in-front STEP`` holds instead in the front
logger's first model evaluation at the validation of step STEP, until SIGTERM; each later evaluation of it then takes
``--slow`` more seconds (a front on real data takes minutes). With ``--devices 2`` it is a 2-process DDP fit (gloo,
configs/ddp.yaml's `TimedDDPStrategy`, whose ``step_timeout`` is ``--step-timeout`` seconds in the fit that holds;
Lightning's launcher re-runs this script for rank 1), and only rank ``--hold-rank`` holds, writing its pid to
``OUT/holding-rank<R>``. ``--resume`` continues from ``OUT/ckpt/last.ckpt``. At the end rank 0 writes
``OUT/final.pt``: the trainable state, the optimizer's state and the front the logger evaluated last.

``--then OUT2`` (DDP): the fit into OUT runs to its end without holding, then a second fit into OUT2, in the same
process group (no second launch), is the one that holds.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from paretomerge import ParetoMerging
from paretomerge.callbacks import ParetoFrontLogger
from paretomerge.modules.checkpoint import AtomicCheckpointIO
from paretomerge.modules.ddp import TimedDDPStrategy
from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite


class HoldAt(L.Callback):
    """At ``step``, say so in a file and wait for the test's signal: SIGKILL ends the process here; after SIGTERM the
    step goes on, and Lightning stops at its end. A rank that holds and gets no signal has stopped answering."""

    def __init__(self, step: int | None, marker: Path, rank: int = 0) -> None:
        self.step, self.marker, self.rank = step, marker, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if trainer.world_size > 1:
                (self.marker.parent / f"holding-rank{self.rank}").write_text(str(os.getpid()))
            self.marker.write_text(str(batch_idx))
            while not trainer.received_sigterm:
                time.sleep(0.1)


class HoldInFront(L.Callback):
    """At the validation of ``step``, the front logger's first model evaluation writes ``marker`` and waits for
    SIGTERM; every later evaluation of that validation then takes ``slow`` seconds more."""

    def __init__(self, step: int | None, marker: Path, slow: float) -> None:
        self.step, self.marker, self.slow = step, marker, slow
        self.armed, self.calls = False, 0

    def setup(self, trainer, pl_module, stage) -> None:
        evaluate = trainer.datamodule.evaluate

        def held(net, *args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls == 1:
                    self.marker.write_text(str(trainer.global_step))
                    while not trainer.received_sigterm:
                        time.sleep(0.1)
                else:
                    time.sleep(self.slow)
            return evaluate(net, *args, **kwargs)

        trainer.datamodule.evaluate = held

    def on_validation_start(self, trainer, pl_module) -> None:
        self.armed = trainer.global_step == self.step

    def on_validation_end(self, trainer, pl_module) -> None:
        self.armed = False


def fit(args: argparse.Namespace, out: Path, suite: TinySuite, hold: bool, resume: bool = False,
        children: list | None = None) -> L.Trainer:
    model = ParetoMerging(rank=4)
    front = ParetoFrontLogger(progress=False, baselines=False)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.every, save_top_k=-1,
                                  save_last=True, save_on_exception=True)
    callbacks = [checkpoints, front]
    if hold:
        callbacks += [HoldAt(args.hold_at, out / "holding", args.hold_rank),
                      HoldInFront(args.hold_in_front, out / "holding", args.slow)]
    step_timeout = {"step_timeout": timedelta(seconds=args.step_timeout)} if hold and args.step_timeout else {}
    strategy = TimedDDPStrategy(process_group_backend="gloo", **step_timeout) if args.devices > 1 else "auto"
    trainer = L.Trainer(max_steps=args.max_steps, val_check_interval=args.val_every or args.max_steps,
                        check_val_every_n_epoch=None, limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False,
                        logger=TensorBoardLogger(out, name="logs"), callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], default_root_dir=out, devices=args.devices, strategy=strategy)
    if children:  # the first fit launched rank 1: this fit ends it if it stops answering, as that fit's would
        trainer.strategy.launcher.procs = children
    trainer.fit(model, datamodule=suite, ckpt_path=str(out / "ckpt" / "last.ckpt") if resume else None)
    if trainer.global_rank == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "front": front.front,
                    "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step}, out / "final.pt")
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("cache")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--hold-rank", type=int, default=0)
    parser.add_argument("--hold-in-front", type=int, default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--step-timeout", type=float, default=None)
    parser.add_argument("--then", type=Path, default=None)
    args = parser.parse_args()
    suite = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=args.cache)
    trainer = fit(args, args.out, suite, hold=args.then is None, resume=args.resume)
    if args.then is not None:
        fit(args, args.then, suite, hold=True, children=trainer.strategy.launcher.procs)


if __name__ == "__main__":
    main()
