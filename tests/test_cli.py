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
from paretomerge.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "synthetic.yaml"


def run_cli(*args, cwd):
    beside = Path(sys.executable).parent / "paretomerge"
    exe = str(beside) if beside.exists() else shutil.which("paretomerge")
    assert exe, "the paretomerge console script is not installed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    assert "{fit,validate,test}" in capsys.readouterr().out


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


def test_fit_refuses_a_truncated_checkpoint_to_resume_from(tmp_path, monkeypatch):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(CONFIG), "--ckpt_path", str(bad)])
    assert "not a readable checkpoint" in str(exit_.value.code)
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["bad.ckpt"]


def test_configs_naming_the_callbacks_old_path_are_refused_with_the_new_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.front_logger.ParetoFrontLogger\n")
    for argv in (["--config", str(CONFIG), "--config", str(old)], [f"--config={CONFIG}", f"--config={old}"],
                 ["--config", str(CONFIG), "--trainer.callbacks+=callbacks.fit_summary.FitSummary"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["fit", *argv])
        assert "write 'paretomerge.callbacks." in str(exit_.value.code), argv


FAST_CONFIG = ROOT / "tests" / "configs" / "tiny_fast.yaml"


@pytest.mark.slow
def test_the_main_job_with_the_map_config_prints_the_table_and_writes_a_checkpoint(fast_tiny, tmp_path, monkeypatch):
    """The main job's config on the fast suite, with configs/map.yaml on top (one fit checks both)."""
    cache_root = fast_tiny.cache_path.parents[1]  # the session's fast suite, built once
    monkeypatch.setenv("PARETOMERGE_CACHE", str(cache_root))  # inherited by run_cli's subprocess
    result = run_cli("fit", "--config", str(FAST_CONFIG), "--config", str(ROOT / "configs" / "map.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert len(out) + len(result.stderr) < 10_000  # a log, not a terminal: no progress bar redrawn at every step
    assert "Pareto Merging, ours (preference-conditioned coefficients, diversity term β_div=0.1): test accuracy (%) " \
           "per task" in out
    header = next(line for line in out.splitlines() if line.startswith("task "))
    for column in ("zero-shot", "individual", "task arith.", "TIES", "PM equal", "PM one-hot"):
        assert column in header
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in ("colour", "stripes", "size", "mean")}
    assert set(rows) == {"colour", "stripes", "size", "mean"}
    for values in rows.values():
        numbers = [float(v) for v in values]
        assert len(numbers) == 7 and all(0 <= v <= 100 for v in numbers[:6])
    assert "hypervolume" in out and "front_test.csv" in out
    assert "Task Arithmetic + preference (θ0 + 0.3·K·Σ_k γ_k τ_k) on the same preferences: hypervolume" in out
    checkpoint = Path(next(line for line in out.splitlines() if line.startswith("Checkpoint: ")).split(": ", 1)[1])
    checkpoint = checkpoint if checkpoint.is_absolute() else tmp_path / checkpoint
    assert checkpoint.name == "last.ckpt" and checkpoint.exists()
    stored = next(line for line in out.splitlines() if line.startswith("Stored Pareto set: "))
    printed_mib = float(stored.split(" is ", 1)[1].split(" MiB")[0])
    assert printed_mib == pytest.approx(checkpoint.stat().st_size / 2**20, abs=0.006)
    assert "int8 SVD factors of each task vector at basis_rank=16" in stored and "squared norm" in stored

    # The printed 'PM equal' column is what at(equal) scores on the suite's test split.
    from paretomerge.suites import FAST_RECIPE, TinySuite

    model = ParetoMerging.load_from_checkpoint(checkpoint)
    suite = TinySuite(tasks=["colour", "stripes", "size"], test_images=128, val_images=64, batch_size=8,
                      progress=False, cache_dir=str(cache_root), recipe=FAST_RECIPE)
    equal = suite.evaluate(model.at([1, 1, 1]))
    for task in ("colour", "stripes", "size"):
        assert float(rows[task][4]) == pytest.approx(100 * equal[task], abs=0.051)

    # configs/map.yaml adds the MAP baseline: its line, its front, and its points on the final figure
    line = next(line for line in out.splitlines() if line.startswith("MAP (plain, "))
    assert line.startswith("MAP (plain, 150 real evaluations")  # the paper's 50 points for K = 3, on 3 tasks
    assert "win_rate_module_vs_map" in line
    assert list(tmp_path.rglob("map_front.csv"))
    assert "front/final/figure" in _events(tmp_path).Tags()["images"]  # with MAP's fronts on its axes


@pytest.mark.slow
def test_the_adamerging_config_fits_and_summarises_one_model(fast_tiny, tmp_path, monkeypatch):
    from paretomerge import AdaMerging
    from paretomerge.suites import FAST_RECIPE, FAST_TASKS, TinySuite

    monkeypatch.setenv("PARETOMERGE_CACHE", str(fast_tiny.cache_path.parents[1]))
    recipe = "{" + ", ".join(f"{k}: {v}" for k, v in FAST_RECIPE.items()) + "}"
    result = run_cli("fit", "--config", str(ROOT / "configs" / "tiny_adamerging.yaml"),
                     "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
                     "--trainer.enable_progress_bar", "false", "--data.init_args.tasks", f"[{','.join(FAST_TASKS)}]",
                     "--data.init_args.recipe", recipe, "--data.init_args.test_images", "128",
                     "--data.init_args.val_images", "64", "--data.init_args.batch_size", "8",
                     "--model.init_args.ties_top_k", "0.2", "--model.init_args.beta_div", "0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AdaMerging: test accuracy (%) per task" in result.stdout
    assert "from paretomerge import AdaMerging" in result.stdout and "AdaMerging.load_from_checkpoint(" in result.stdout
    mean_row = next(line for line in result.stdout.splitlines() if line.startswith("mean "))
    printed = float(mean_row.split()[-1])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    model = AdaMerging.load_from_checkpoint(checkpoint)
    assert model.hparams.ties_top_k == 0.2 and model.hparams.beta_div == 0.1 and model.lambdas.shape[1] == 3
    suite = TinySuite(tasks=list(FAST_TASKS), recipe=FAST_RECIPE, test_images=128, val_images=64, batch_size=8,
                      progress=False)
    accuracy = suite.evaluate(model.at())
    assert printed == pytest.approx(100 * sum(accuracy.values()) / 3, abs=0.051)
    # the front logger draws AdaMerging's one point beside Task Arithmetic: a one-point front at the end
    events = _events(tmp_path)
    assert "front/figure" in events.Tags()["images"]
    assert events.Scalars("final/non_dominated")[-1].value == 1
    assert events.Scalars("front/acc/equal/colour")[-1].value == pytest.approx(accuracy_val(model, suite, "colour"))


def _events(root: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(root.rglob("events.out.tfevents*")).parent), size_guidance={"images": 0})
    events.Reload()
    return events


def accuracy_val(model, suite, task: str) -> float:
    return suite.evaluate(model.at(), split="val", tasks=[task])[task]


class MyMerging(ParetoMerging):
    """A user's subclass: the summary must name it and show its own loading call."""


def test_the_summary_names_the_module_it_summarises():
    from paretomerge import AdaMerging
    from paretomerge.callbacks.fit_summary import describe, loading_lines

    assert describe(ParetoMerging()) == "Pareto Merging, ours (preference-conditioned coefficients, diversity term " \
                                         "β_div=0.1)"
    assert describe(ParetoMerging(preference_coefficients=False, beta_div=0)) == "Pareto Merging, the paper's " \
                                                                                 "configuration"
    assert describe(MyMerging()) == "MyMerging" and describe(AdaMerging()) == "AdaMerging"
    lines = loading_lines(MyMerging(), "run/last.ckpt", "net = model.at([1, 0])", ["a", "b"])
    assert lines[1:3] == ["    from tests.test_cli import MyMerging",
                          "    model = MyMerging.load_from_checkpoint('run/last.ckpt')"]
    assert loading_lines(AdaMerging(), "", "net = model.at()", ["a"])[1] == "    from paretomerge import AdaMerging"
