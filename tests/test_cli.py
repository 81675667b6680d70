"""The `paretomerge` console script (LightningCLI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paretomerge import ParetoMerging

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "synthetic.yaml"


def run_cli(*args, cwd):
    beside = Path(sys.executable).parent / "paretomerge"
    exe = str(beside) if beside.exists() else shutil.which("paretomerge")
    assert exe, "the paretomerge console script is not installed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_help_lists_the_subcommands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{fit,validate,test}" in result.stdout


@pytest.mark.slow
def test_fit_with_the_test_config_writes_a_loadable_checkpoint_and_tensorboard_logs(tmp_path):
    result = run_cli("fit", "--config", str(CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    model = ParetoMerging.load_from_checkpoint(checkpoints[0])
    assert model.hparams.rank == 4
    out = model.at([0.2, 0.3, 0.5])(torch.randn(2, 3, 16, 16), task="task2")
    assert out.shape == (2, 5) and torch.isfinite(out).all()

    result = run_cli("validate", "--config", str(CONFIG), "--ckpt_path", str(checkpoints[0]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/acc/equal/mean" in result.stdout


def test_fit_refuses_a_truncated_checkpoint_to_resume_from(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run_cli("fit", "--config", str(CONFIG), "--ckpt_path", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert "not a readable checkpoint" in result.stderr
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["bad.ckpt"]
