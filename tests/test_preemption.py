"""Preemption (issue 19): a fit killed or stopped anywhere resumes to the bitwise result of an uninterrupted one; a
DDP rank that dies or hangs ends the job (issue 34)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from paretomerge import ParetoMerging

ROOT = Path(__file__).resolve().parents[1]


def fit_command(out: Path, cache: Path, *options: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "preempt_fit.py"), str(out), str(cache), *options]


def run_to_end(out: Path, cache: Path, *options: str) -> dict:
    result = subprocess.run(fit_command(out, cache, *options), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


def start_and_hold(out: Path, cache: Path, *options: str) -> subprocess.Popen:
    """A fit that holds where ``options`` say (``--hold-at``, ``--hold-in-front``); returns once it holds there."""
    (out / "holding").unlink(missing_ok=True)
    process = subprocess.Popen(fit_command(out, cache, *options), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "holding").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the fit never reached the point to hold at"
        time.sleep(0.2)
    return process


def assert_equal_nested(resumed, uninterrupted, where: str) -> None:
    if isinstance(uninterrupted, torch.Tensor):
        assert torch.equal(resumed, uninterrupted), f"{where} differs after the resume"
    elif isinstance(uninterrupted, dict):
        assert resumed.keys() == uninterrupted.keys(), where
        for key, value in uninterrupted.items():
            assert_equal_nested(resumed[key], value, f"{where}[{key!r}]")
    elif isinstance(uninterrupted, (list, tuple)):
        assert len(resumed) == len(uninterrupted), where
        for i, value in enumerate(uninterrupted):
            assert_equal_nested(resumed[i], value, f"{where}[{i}]")
    else:
        assert resumed == uninterrupted, f"{where} differs after the resume"


def assert_same_result(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["step"] == uninterrupted["step"]
    assert_equal_nested(resumed["state"], uninterrupted["state"], "state")  # λ, ω, G, A, B
    assert_equal_nested(resumed["optimizer"], uninterrupted["optimizer"], "optimizer")  # Adam's moments and steps
    assert torch.equal(resumed["front"], uninterrupted["front"])  # the front the logger wrote at the end


@pytest.fixture(scope="module")
def uninterrupted(fast_tiny, tmp_path_factory) -> dict:
    return run_to_end(tmp_path_factory.mktemp("whole"), fast_tiny.cache_path.parents[1])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(fast_tiny, uninterrupted, tmp_path):
    cache = fast_tiny.cache_path.parents[1]
    # 16 batches an epoch: checkpoints at steps 3, 6 and 9, killed at step 10; the resume starts at batch 9 of epoch 0.
    process = start_and_hold(tmp_path / "killed", cache, "--hold-at", "10")
    assert (tmp_path / "killed" / "holding").read_text() == "10"  # batch 10 of the epoch: mid-epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = run_to_end(tmp_path / "killed", cache, "--resume")
    assert_same_result(resumed, uninterrupted)


def preempt(process: subprocess.Popen, grace: float = 30.0) -> tuple[int, str]:
    """SLURM's preemption: SIGTERM, then SIGKILL if the process is still there after ``grace`` seconds. Returns the
    exit status and stderr."""
    os.kill(process.pid, signal.SIGTERM)
    try:
        stderr = process.communicate(timeout=grace)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        stderr = process.communicate()[1] + f"\n(killed: still running {grace} s after SIGTERM)"
    return process.returncode, stderr


@pytest.mark.slow
def test_sigterm_in_a_front_evaluation_and_in_a_step_saves_at_once_and_resumes_bitwise(fast_tiny, uninterrupted,
                                                                                       tmp_path):
    """Lightning turns SIGTERM into a stop at the end of the current step; ``ModelCheckpoint(save_on_exception=True)``
    then writes that step's checkpoint and ``last.ckpt``. One fit, stopped twice (validating at step 7, which changes
    no training state, so the uninterrupted fit that validates at its end only is the reference):

    1. in the front logger's evaluation at step 7's validation, whose remaining 36 models would take 72 s more (a
       front on real data takes minutes, SLURM's grace period 30-90 s): the logger stops before the next model, so
       step 7's checkpoint is written within the grace period (the last one before it is step 6's);
    2. resumed, the fit evaluates the interrupted front first (logged at step 7), then is stopped in step 10;
    3. resumed again, it ends as the uninterrupted fit does."""
    cache, out = fast_tiny.cache_path.parents[1], tmp_path / "stopped"
    status, stderr = preempt(start_and_hold(out, cache, "--val-every", "7", "--hold-in-front", "7", "--slow", "2"))
    last = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7, stderr[-3000:]  # written by the stop, not step 6's
    assert status == 0 and "SIGTERM while evaluating the front at step 7" in stderr, stderr[-3000:]
    assert last["callbacks"]["ParetoFrontLogger"] == {"validations": 1, "pending": 7}

    status, stderr = preempt(start_and_hold(out, cache, "--val-every", "7", "--resume", "--hold-at", "10"))
    assert status == 0, stderr[-3000:]
    assert torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 11  # step 10, then the stop
    events = EventAccumulator(str(out / "logs" / "version_1"))
    events.Reload()
    assert [e.step for e in events.Scalars("front/hypervolume")] == [7]  # the interrupted front, evaluated first

    resumed = run_to_end(out, cache, "--val-every", "7", "--resume")
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


STEP_TIMEOUT = 10  # seconds: TimedDDPStrategy(step_timeout) in the DDP fits below


@pytest.fixture(scope="module")
def ddp_whole_then_hung(fast_tiny, tmp_path_factory) -> dict:
    """One 2-process launch: an uninterrupted DDP fit (what a resumed one must equal), then, in the same process group,
    a fit in which rank 1 stops answering in step 4 without dying. How that launch ended is for the test to judge."""
    cache, root = fast_tiny.cache_path.parents[1], tmp_path_factory.mktemp("ddp")
    hung, log = root / "hung", root / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(fit_command(root / "whole", cache, "--devices", "2", "--step-timeout",
                                               str(STEP_TIMEOUT), "--then", str(hung), "--hold-at", "4",
                                               "--hold-rank", "1"),
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + 600
        while not (hung / "holding-rank1").exists():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached the step to hang at"
            time.sleep(0.2)
        hanging = time.monotonic()
        time.sleep(0.5)  # let the pid be written whole
        pid = int((hung / "holding-rank1").read_text())
        try:
            process.wait(timeout=STEP_TIMEOUT + 60)
        except subprocess.TimeoutExpired:  # the job did not end: end it here, and let the test say so
            for victim in (pid, process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            process.wait()
    return {"whole": torch.load(root / "whole" / "final.pt", weights_only=False), "hung": hung, "pid": pid,
            "seconds": time.monotonic() - hanging, "returncode": process.returncode, "stderr": log.read_text()}


@pytest.mark.slow
def test_ddp_a_hung_rank_ends_the_job_in_the_step_timeout_naming_it(ddp_whole_then_hung):
    """Rank 1 hangs in step 4 (alive, in a callback, no signal). Rank 0 waits in the step's loss all-reduce until
    ``step_timeout``, finds in the roll call that rank 1 does not answer, says so, ends rank 1 and exits; step 3's
    checkpoint is the last one written, and loads."""
    run = ddp_whole_then_hung
    assert run["seconds"] < STEP_TIMEOUT + 20, f"the job took {run['seconds']:.0f} s to end: {run['stderr'][-3000:]}"
    assert run["returncode"] == 1, run["stderr"][-3000:]
    assert "CollectiveTimeoutError: rank 0: a collective of training step 4 got no answer within 0:00:10 " \
           "(step_timeout): rank 1 stopped answering" in run["stderr"], run["stderr"][-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(run["pid"], 0)  # the hung rank was ended
    checkpoints = run["hung"] / "ckpt"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    ParetoMerging.load_from_checkpoint(checkpoints / "last.ckpt").at([1, 1, 1])


@pytest.mark.slow
def test_ddp_a_killed_rank_ends_the_job_without_a_hang_and_the_resume_is_bitwise_equal(fast_tiny, ddp_whole_then_hung,
                                                                                       tmp_path):
    cache = fast_tiny.cache_path.parents[1]
    whole = ddp_whole_then_hung["whole"]
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
    # no checkpoint of the step that did not finish (save_on_exception would have written one): step 9's is the last
    assert sorted(p.name for p in (out / "ckpt").glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt",
                                                                    "epoch=1-step=9.ckpt", "last.ckpt"]
    resumed = run_to_end(out, cache, "--devices", "2", "--resume")
    assert_same_result(resumed, whole)
