"""`TimedDDPStrategy`: Lightning's DDP whose training steps give up on a rank that stops answering, and name it.

A collective waits for every rank. NCCL's default is 10 minutes and gloo's (and Lightning's) 30, so a rank that
hangs without dying (a stuck GPU or file system, a deadlock) holds every other rank, and the allocation, that long.
A training step's collectives (the loss check's all-reduce, the gradient all-reduce) only wait for the other
ranks' share of the same step, so they get a short bound, ``step_timeout``. Every other collective keeps Lightning's
``timeout``: the setup barriers while one process per node builds or checks a suite, the basis broadcast, the
barrier while rank 0 writes a checkpoint, validation, and the first step after fit start or a validation, whose
collectives wait while rank 0 alone evaluates a front, runs MAP or writes a checkpoint.

When a step's collective times out, the rank reports in the rendezvous store (rank 0's process holds it), waits a
short while for the others to report too (they time out at about the same moment), and raises
`CollectiveTimeoutError` naming those that did not: the ranks that stopped answering. Nothing of the unfinished step
is saved (no checkpoint, no more barriers), so the last checkpoint written is the last good one. The processes this
one launched (Lightning's launcher, one node) are ended, so the job ends; under torchrun or ``srun
--kill-on-bad-exit=1`` the launcher ends the others when this one exits.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT = timedelta(minutes=3)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_LOST = re.compile(r"connection closed by peer|connection reset by peer|broken pipe", re.IGNORECASE)


class CollectiveTimeoutError(RuntimeError):
    """A training step's collective got no answer within ``step_timeout``; the message names the silent ranks."""


def collective_failure(err: BaseException) -> str | None:
    """``"timeout"`` for a collective that timed out, ``"lost"`` for a peer whose connection closed, else None."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    backend = isinstance(err, dist.DistError) or "gloo" in text or "nccl" in text.lower() or "pair closure" in text
    if backend and _TIMEOUT.search(text):
        return "timeout"
    if backend and _LOST.search(text):
        return "lost"
    return None


def roll_call(rank: int, world_size: int, step: int, window: float) -> list[int] | None:
    """Report ``rank`` in the rendezvous store and wait up to ``window`` seconds for the others' reports at ``step``.

    Returns the ranks that did not report, or None when the store does not answer (rank 0's process is gone)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"paretomerge/roll_call/{step}/"
        store.set(f"{key}{rank}", "here")
        deadline = time.monotonic() + window
        silent = [r for r in range(world_size) if r != rank]
        while True:
            silent = [r for r in silent if not store.check([f"{key}{r}"])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # DistError and DistStoreError are RuntimeErrors
        return None


class TimedDDPStrategy(DDPStrategy):
    """Lightning's `DDPStrategy` (every argument of it, ``timeout`` included) plus ``step_timeout``: how long a
    training step's collectives wait for the other ranks before the job ends naming the ranks that stopped answering
    (None: ``timeout``, as in Lightning). It must exceed the longest step a rank can take; ``timeout`` (30 minutes by
    default) bounds everything else, including the waits on rank 0's front evaluation, MAP and checkpoint writes."""

    def __init__(self, *args: Any, step_timeout: timedelta | None = DEFAULT_STEP_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if step_timeout is not None and (not isinstance(step_timeout, timedelta) or step_timeout <= timedelta(0)):
            raise ValueError(f"step_timeout must be a positive timedelta or None, got {step_timeout!r}")
        if step_timeout is not None and self._timeout is not None and step_timeout > self._timeout:
            raise ValueError(f"step_timeout ({step_timeout}) must not exceed timeout ({self._timeout}), which bounds "
                             "the longer waits outside a training step")
        self.step_timeout = step_timeout
        self._bounded = False  # whether the next step's collectives get step_timeout (the ranks arrive together)
        self._failed: str | None = None  # why the process group is unusable: no checkpoint, no barrier after it

    # ------------------------------------------------------------------ the bound
    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self.step_timeout is not None:
            rank_zero_info(f"{type(self).__name__}: a training step's collectives time out after {self.step_timeout} "
                           f"(step_timeout), every other collective after {self._group_timeout()} (timeout)")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._bounded = False

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._bounded = False  # rank 0 may then work alone (front, MAP, checkpoint) while the others wait

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """The step's forward, loss check, backward (the gradient all-reduce) and update: its collectives get
        ``step_timeout`` unless the ranks may arrive apart (the first step after fit start or a validation)."""
        bound = self.step_timeout if self._bounded and dist.is_initialized() else None
        if bound is not None:
            dist.set_timeout(bound)
        try:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        except RuntimeError as err:
            failure = collective_failure(err)
            if failure is not None:
                self._give_up(err, failure, bound)
            raise
        finally:
            if bound is not None and self._failed is None:
                dist.set_timeout(self._group_timeout())
        self._bounded = True
        return output

    def _group_timeout(self) -> timedelta:
        return self._timeout if self._timeout is not None else \
            dist.distributed_c10d._get_default_timeout(self._get_process_group_backend())

    # ------------------------------------------------------------------ after a failed step
    def _give_up(self, err: RuntimeError, failure: str, bound: timedelta | None) -> None:
        trainer = self.lightning_module.trainer
        step, rank = trainer.global_step, self.global_rank
        self._failed = f"a collective of training step {step} failed"
        for callback in trainer.checkpoint_callbacks:  # ModelCheckpoint(save_on_exception=True) then does not try
            if hasattr(callback, "_last_global_step_saved"):  # (nor say it saved); save_checkpoint refuses anyway
                callback._last_global_step_saved = step
        if failure == "lost":
            return  # a peer exited or was killed: its own log says why; Lightning's launcher ends the rest
        window = min(max(0.25 * (bound or self._group_timeout()).total_seconds(), 1.0), 60.0)
        silent = roll_call(rank, self.world_size, step, window)
        setting = "step_timeout" if bound is not None else "timeout"
        timeout = f"{bound or self._group_timeout()} ({setting})"
        if silent is None:
            who = "rank 0 stopped answering (its process, which holds the rendezvous store, does not answer)"
        elif silent:
            answered = ", ".join(str(r) for r in range(self.world_size) if r not in silent and r != rank)
            who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering (hung, or "
                   f"gone: see {'their' if len(silent) > 1 else 'its'} log)"
                   + (f"; rank(s) {answered} timed out waiting too" if answered else ""))
        else:
            who = "every rank answered the roll call: the collective itself failed (network, or mismatched calls)"
        message = (f"rank {rank}: a collective of training step {step} got no answer within {timeout}: {who}. "
                   f"Nothing of step {step} is saved; the last checkpoint written is the last good one (resume with "
                   f"--ckpt_path last). The bound: {type(self).__name__}({setting}=...), "
                   f"--trainer.strategy.init_args.{setting} h:m:s")
        log.error(message)  # now, in case this process is ended before the exception is printed
        self._end_children()
        raise CollectiveTimeoutError(message) from err

    def _end_children(self) -> None:
        """Kill the ranks this process launched (Lightning's launcher): a hung one would hold the job forever."""
        children = getattr(self.launcher, "procs", None)
        if not children:
            return
        ending = list(children)
        children.clear()  # first: Lightning's child observer then stops watching, instead of killing this process
        for process in ending:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=60)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._failed is not None:
            if self.is_global_zero:
                log.warning(f"not writing {filepath}: {self._failed}, so its state is not a finished step")
            return
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._failed is None:  # after a failure the others are gone or stuck: waiting again would only hang
            super().barrier(*args, **kwargs)
