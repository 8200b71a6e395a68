"""What a run prints: one-line log messages and progress (a tqdm bar or whole lines)."""

from __future__ import annotations

import sys
import time
from typing import IO


def log(msg: str, source: str = "peel-fed") -> None:
    """Print ``[source] msg``, flushed so that it interleaves with Flower's and Ray's logs."""
    print(f"[{source}] {msg}", flush=True)


class LineProgress:
    """Progress as whole lines, at most one per ``every_s`` seconds and one at the end: for
    output that is not a terminal (a log file, Flower's log stream from a deployed ServerApp),
    where a tqdm bar's carriage returns never complete a line."""

    def __init__(
        self, total: int, desc: str, every_s: float = 15.0, file: IO[str] | None = None
    ) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.file = file or sys.stdout
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        extra = f" ({self.postfix})" if self.postfix else ""
        print(
            f"[progress] {self.desc}: {self.n}/{self.total}{extra}, {elapsed:.0f} s",
            file=self.file,
            flush=True,
        )
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._line()


def progress_bar(total: int, desc: str, enabled: bool):
    """The project's progress bar: tqdm (transient) on a terminal, :class:`LineProgress` lines
    otherwise, and a no-op bar when ``enabled`` is False."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
