"""Progress on long work: tqdm bars on a terminal, plain lines in a log.

When stderr is a terminal, `progress_bar` is a tqdm bar. When it is not (output redirected to a file, CI), a bar's every
redraw would land in the file; `progress_bar` then writes at most one line every `LOG_EVERY` seconds while a stage runs,
and one line when it ends. `paretomerge.callbacks.LogProgressBar` does the same for Lightning's training loop (the
CLI puts it in place of Lightning's bar when stderr is not a terminal). Pure Python and tqdm, so every room may use it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

LOG_EVERY = 30.0  # seconds between two lines of the same stage in a log (a slow machine keeps a short log)


def interactive() -> bool:
    """Whether stderr is a terminal (progress bars redraw in place there)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
             large: bool = True) -> Any:
    """A progress indicator over ``iterable`` (or updated by hand up to ``total``) with tqdm's interface (iterate,
    ``update``, ``set_postfix``, ``set_postfix_str``, ``close``, ``with``). ``enabled=False``, or ``large=False`` on a
    terminal (work too short to deserve a bar), shows nothing."""
    if enabled and not interactive():
        return LineProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, disable=not (enabled and large), leave=False, dynamic_ncols=True)


class LineProgress:
    """tqdm's interface, as lines on stderr: at most one every `LOG_EVERY` seconds, and one at the end."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str) -> None:
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.start = 0, "", time.monotonic()
        self.last, self.closed = self.start, False

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total and not final else ""
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {'done, ' if final else ''}{count}{share} in {elapsed:.0f} s{tail}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY:
            self.last = now
            print(self._line(), file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if time.monotonic() - self.start >= 1.0:  # a stage over in a blink needs no line
                print(self._line(final=True), file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
