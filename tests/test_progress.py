"""Progress in a log: when stderr is not a terminal, lines every few seconds instead of bars redrawn in place."""

from __future__ import annotations

import pytest

from paretomerge import progress as progress_module
from paretomerge.callbacks import LogProgressBar
from paretomerge.cli import main as cli_main
from paretomerge.progress import LineProgress, progress_bar
from tests.conftest import make_trainer
from tests.test_cli import CONFIG


class Clock:
    """time.monotonic advancing by ``tick`` seconds at each call."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_in_a_log_a_stage_writes_a_line_every_few_seconds_and_one_at_the_end(monkeypatch, capsys):
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(0.1))  # 1000 items over ~200 s
    bar = progress_bar(range(1000), desc="fine-tuning digit")
    assert isinstance(bar, LineProgress)  # capsys's stderr is no terminal
    assert sum(1 for _ in bar) == 1000
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert len(lines) <= 200 / progress_module.LOG_EVERY + 2
    assert lines[0].startswith("fine-tuning digit: ") and "%" in lines[0]
    assert lines[-1].startswith("fine-tuning digit: done, 1000/1000 in ")


def test_by_hand_with_a_postfix_and_nothing_for_a_short_or_disabled_stage(monkeypatch, capsys):
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(6.0))
    with progress_bar(total=4, desc="pretraining") as bar:
        for _ in range(4):
            bar.set_postfix(loss="0.1234", refresh=False)
            bar.update()
    err = capsys.readouterr().err
    assert "pretraining: done, 4/4" in err and "loss=0.1234" in err
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(0.001))
    list(progress_bar(range(10), desc="quick"))  # over in a blink: no line
    list(progress_bar(range(10), desc="off", enabled=False))
    assert capsys.readouterr().err == ""


def test_lightning_progress_in_a_log(suite, tmp_path, monkeypatch, capsys):
    from paretomerge import ParetoMerging

    monkeypatch.setattr(progress_module, "LOG_EVERY", 0.0)  # a line at every step
    monkeypatch.setattr("paretomerge.callbacks.progress_bar.LOG_EVERY", 0.0)
    trainer = make_trainer(tmp_path, max_steps=3, enable_progress_bar=True, callbacks=[LogProgressBar()],
                           val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(ParetoMerging(rank=2), datamodule=suite)
    err = capsys.readouterr().err
    assert "training: step 1/3" in err and "train/loss=" in err
    assert "validated at step 2/3" in err and "training: done, step 3/3" in err
    assert "\r" not in err


@pytest.mark.slow
def test_the_cli_logs_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3"])
    err = capsys.readouterr().err
    assert "training: done, step 3/3" in err and "\r" not in err  # LogProgressBar, not Lightning's tqdm bar
