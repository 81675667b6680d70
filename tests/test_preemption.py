"""Preemption (issue 19): a fit killed anywhere resumes to the bitwise result of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fit_command(out: Path, cache: Path, *options: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "preempt_fit.py"), str(out), str(cache), *options]


def run_to_end(out: Path, cache: Path, *options: str) -> dict:
    result = subprocess.run(fit_command(out, cache, *options), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


def start_and_hold(out: Path, cache: Path, step: int) -> subprocess.Popen:
    """A fit that waits at ``step`` (after the checkpoints before it); returns once it is waiting there."""
    process = subprocess.Popen(fit_command(out, cache, "--hold-at", str(step)), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "holding").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the fit never reached the step to hold at"
        time.sleep(0.2)
    return process


def assert_same_result(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["step"] == uninterrupted["step"]
    assert resumed["state"].keys() == uninterrupted["state"].keys()
    for name, value in uninterrupted["state"].items():
        assert torch.equal(resumed["state"][name], value), f"{name} differs after the resume"
    assert torch.equal(resumed["front"], uninterrupted["front"])  # the front the logger wrote at the end


@pytest.fixture(scope="module")
def uninterrupted(fast_tiny, tmp_path_factory) -> dict:
    return run_to_end(tmp_path_factory.mktemp("whole"), fast_tiny.cache_path.parents[1])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(fast_tiny, uninterrupted, tmp_path):
    cache = fast_tiny.cache_path.parents[1]
    # 16 batches an epoch: checkpoints at steps 3, 6 and 9, killed at step 10; the resume starts at batch 9 of epoch 0.
    process = start_and_hold(tmp_path / "killed", cache, step=10)
    assert (tmp_path / "killed" / "holding").read_text() == "10"  # batch 10 of the epoch: mid-epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = run_to_end(tmp_path / "killed", cache, "--resume")
    assert_same_result(resumed, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_last_and_exits_cleanly_then_resume_is_bitwise_equal(fast_tiny, uninterrupted, tmp_path):
    """Lightning turns SIGTERM into a stop at the end of the current step; ``ModelCheckpoint(save_on_exception=True)``
    then writes that step's checkpoint and ``last.ckpt``."""
    cache = fast_tiny.cache_path.parents[1]
    process = start_and_hold(tmp_path / "stopped", cache, step=10)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    last = torch.load(tmp_path / "stopped" / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 11  # step 10 finished, then the stop
    resumed = run_to_end(tmp_path / "stopped", cache, "--resume")
    assert_same_result(resumed, uninterrupted)


KILLED_WHILE_WRITING = """
import os, signal, sys, torch
from paretomerge.modules.checkpoint import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"version": 1, "weights": torch.arange(1000)}, path)
real_save = torch.save
def save_then_die(obj, handle, *args, **kwargs):  # half the bytes reach the disk, then the process is killed
    real_save(obj, handle, *args, **kwargs)
    handle.truncate(handle.tell() // 2)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
io.save_checkpoint({"version": 2, "weights": torch.arange(1000)}, path)
"""


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path):
    """The next resume falls back to the previous whole checkpoint: the half-written one never had its name."""
    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert torch.load(path, weights_only=True)["version"] == 1
    partial = list(tmp_path.glob(".last.ckpt.partial-*"))
    assert len(partial) == 1 and partial[0].stat().st_size < path.stat().st_size  # left beside it, never loaded


def test_a_resumed_fit_runs_map_at_the_same_validations(tmp_path):
    import lightning as L

    from paretomerge import ParetoMerging, TaskVectors
    from paretomerge.callbacks import MAPBaseline
    from tests.own_models import heads_for, problem
    from tests.test_own_models import suite_for

    class RecordingMAP(MAPBaseline):
        def __init__(self):
            super().__init__(every_n_validations=2, budget=10, real_samples=2, generations=3)
            self.ran_at = []

        def _run(self, trainer, pl_module):
            self.ran_at.append(trainer.global_step)
            super()._run(trainer, pl_module)

    pretrained, finetuned, _, size = problem("torch_nn")
    tv = TaskVectors.from_models(pretrained, finetuned, ["a", "b"], heads_for("torch_nn"))

    def fit(steps, ckpt_path=None):
        recorder = RecordingMAP()
        trainer = L.Trainer(max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.callbacks.append(recorder)
        trainer.fit(ParetoMerging(rank=2, targets=None), suite_for(tv, size, n=16), ckpt_path=ckpt_path)
        return trainer, recorder

    _, whole = fit(6)
    first, before = fit(3)
    first.save_checkpoint(tmp_path / "at3.ckpt")
    _, after = fit(6, tmp_path / "at3.ckpt")
    assert whole.ran_at == [2, 4, 6, 6]  # every 2nd validation, and at the end of the fit
    assert before.ran_at + after.ran_at == [2, 3, 4, 6, 6]  # the first fit's own end (3), then the same rhythm


@pytest.mark.slow
def test_ddp_a_killed_rank_ends_the_job_without_a_hang_and_the_resume_is_bitwise_equal(fast_tiny, tmp_path):
    cache = fast_tiny.cache_path.parents[1]
    whole = run_to_end(tmp_path / "whole", cache, "--devices", "2")
    out = tmp_path / "killed"
    # 8 batches an epoch on each rank: the resume from step 9 starts at batch 1 of epoch 1.
    process = subprocess.Popen(fit_command(out, cache, "--devices", "2", "--hold-at", "10", "--hold-rank", "1"),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "holding-rank1").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "rank 1 never reached the step to hold at"
        time.sleep(0.2)
    time.sleep(0.5)  # let the pid be written whole
    os.kill(int((out / "holding-rank1").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    process.communicate(timeout=180)  # rank 0, waiting for rank 1 in a collective, must not hang
    assert time.monotonic() - killed_at < 120
    assert process.returncode != 0
    resumed = run_to_end(out, cache, "--devices", "2", "--resume")
    assert_same_result(resumed, whole)
