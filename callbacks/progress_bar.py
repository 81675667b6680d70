"""`LogProgressBar`: Lightning's progress as lines, for a log.

``paretomerge fit`` puts it in place of Lightning's default bar when stderr is not a terminal (a redirected log, CI),
where a bar redrawn at every step would fill the file; add it to ``trainer.callbacks`` to choose it yourself.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar

from paretomerge.progress import LOG_EVERY


class LogProgressBar(ProgressBar):
    """On stderr: a line every `LOG_EVERY` seconds of training (the step and the progress-bar metrics, such as
    ``train/loss``), one after each validation and one at the end."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._start, self._last = True, 0.0, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, trainer: Any, pl_module: Any, what: str) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        step = f"step {trainer.global_step}/{total}" if total else f"step {trainer.global_step}"
        print(f"{what} {step} in {time.monotonic() - self._start:.0f} s" + (f": {shown}" if shown else ""),
              file=sys.stderr, flush=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        now = time.monotonic()
        if self._enabled and trainer.is_global_zero and now - self._last >= LOG_EVERY:
            self._last = now
            self._say(trainer, pl_module, "training:")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._say(trainer, pl_module, "validated at")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled and trainer.is_global_zero:
            self._say(trainer, pl_module, "training: done,")
