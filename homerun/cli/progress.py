"""Progress bars for long work (synthetic checkpoint writes, model loads, downloads): a rich bar with bytes done,
rate and ETA, on stderr only (stdout stays the command's result, one JSON document with --json). Transient: the
bar disappears when the work ends, and a stderr that is not a terminal (a log file) gets nothing."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)


class ByteProgress:
    """`with byte_progress(out, "writing") as bar: bar.update(done_bytes, total_bytes)`. With `after_s`, the bar
    only appears once the work has run that long (a short load shows nothing)."""

    def __init__(self, console: Any, description: str, *, after_s: float = 0.0) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
        self.task = self.bar.add_task(description, total=None)
        self.after_s = after_s
        self.t0 = time.perf_counter()
        self.started = False

    def __enter__(self) -> "ByteProgress":
        self.t0 = time.perf_counter()
        if self.after_s <= 0:
            self._start()
        return self

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.bar.start()

    def update(self, done: float, total: float | None, name: str | None = None) -> None:
        self.bar.update(self.task, completed=done, total=total or None)
        if not self.started and time.perf_counter() - self.t0 >= self.after_s:
            self._start()

    def __call__(self, done: float, total: float | None, name: str | None = None) -> None:
        self.update(done, total, name)

    def refresh(self) -> None:
        if self.started:
            self.bar.refresh()

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.bar.stop()


def byte_progress(out: Any, description: str, *, after_s: float = 0.0) -> ByteProgress:
    """A bar on the Output's stderr console (`out.err`)."""
    return ByteProgress(out.err, description, after_s=after_s)
