"""Progress of long commands (backup, restore, verify --deep): messages, and bytes done of a total.

Core code reports through the callback it is given: `progress(message)` for a step, and
`meter(progress, what, total)` for the bytes of a long one. A plain callback (the scheduler's job log,
a drill) gets the messages only; the CLI passes a Display, which also shows the bytes: a rich
progress bar (bytes, rate, ETA) when stderr is a terminal, else the usual `HH:MM:SS message` lines,
a byte count at most every few seconds; nothing with -q.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

from pgvault.units import format_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

Notify = Callable[[str], None]
Mode = Literal["quiet", "bar", "lines"]
# Byte counts as lines: one every this many seconds (a long restore logs a line every 5 s, not thousands).
LINE_INTERVAL = 5.0


class Meter(Protocol):
    """The bytes of one long step. advance() may be called from several threads at once."""

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Meter: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _MeterBase:
    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Silent(_MeterBase):
    pass


def meter(progress: Notify, what: str, total: int | None) -> Meter:
    """A meter of `what` (bytes done of total, None when unknown), shown if progress can show one."""
    start = getattr(progress, "meter", None)
    return start(what, total) if callable(start) else _Silent()


def _rate(nbytes: float, seconds: float) -> str:
    return f"{format_size(int(nbytes / seconds))}/s" if seconds > 0 else "-"


class _LineMeter(_MeterBase):
    """`what: 1.2 GiB of 4.0 GiB (30%), 120.0 MiB/s, about 25 s left`, at most every interval seconds."""

    def __init__(self, emit: Notify, what: str, total: int | None, interval: float,
                 clock: Callable[[], float]) -> None:
        self._emit = emit
        self._what = what
        self._total = total
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._started = self._last = clock()
        self._done = 0
        self._lines = 0
        self._closed = False

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            now = self._clock()
            if now - self._last < self._interval or self._closed:
                return
            self._last = now
            self._lines += 1
            done, elapsed = self._done, now - self._started
        line = f"{self._what}: {format_size(done)}"
        if self._total:
            line += f" of {format_size(self._total)} ({min(100, done * 100 // self._total)}%)"
        line += f", {_rate(done, elapsed)}"
        if self._total and done and self._total > done:
            line += f", about {max(1, math.ceil((self._total - done) * elapsed / done))} s left"
        self._emit(line)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            done, elapsed, lines = self._done, self._clock() - self._started, self._lines
        if lines:  # a step short enough to need no count needs no summary either
            self._emit(f"{self._what}: {format_size(done)} in {elapsed:.1f} s ({_rate(done, elapsed)})")


class _BarMeter(_MeterBase):
    def __init__(self, display: Display, bar: RichProgress, task: TaskID) -> None:
        self._display = display
        self._bar = bar
        self._task = task
        self._closed = False

    def advance(self, nbytes: int) -> None:
        self._bar.advance(self._task, nbytes)  # rich's Progress takes its own lock

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._display._task_done(self._bar)


class Display:
    """Where the CLI's progress goes; use as a context manager so a live bar always ends.

    bar: a rich Console (stderr unless given) draws one bar per meter, messages scroll above it.
    lines: `HH:MM:SS message` on stream (stderr unless given). quiet: nothing.
    """

    def __init__(self, mode: Mode, *, stream: TextIO | None = None, console: Console | None = None,
                 interval: float = LINE_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self._stream = stream
        self._console = console
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # One live bar display at a time (rich allows no more), with a row per open meter.
        self._bar: RichProgress | None = None
        self._open = 0

    @classmethod
    def for_stderr(cls, *, quiet: bool) -> Display:
        if quiet:
            return cls("quiet")
        return cls("bar" if sys.stderr.isatty() else "lines")

    def __call__(self, message: str) -> None:
        if self.mode == "quiet":
            return
        line = f"{datetime.now().strftime('%H:%M:%S')} {message}"
        if self.mode == "bar":
            # Printed through a live bar's console, the line lands above the bar instead of through it.
            with self._lock:
                console = self._bar.console if self._bar is not None else self._get_console()
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def meter(self, what: str, total: int | None) -> Meter:
        if self.mode == "quiet":
            return _Silent()
        if self.mode == "lines":
            return _LineMeter(self, what, total, self._interval, self._clock)
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with self._lock:
            if self._bar is None:
                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=self._get_console())
                self._bar.start()
            self._open += 1
            bar = self._bar
        return _BarMeter(self, bar, bar.add_task(what, total=total))

    def _get_console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def _task_done(self, bar: RichProgress) -> None:
        with self._lock:
            if bar is not self._bar:
                return
            self._open -= 1
            if self._open:
                return
            self._bar = None
        bar.stop()  # the finished bars stay on the screen; the next meter starts a new display

    def close(self) -> None:
        with self._lock:
            bar, self._bar, self._open = self._bar, None, 0
        if bar is not None:
            bar.stop()

    def __enter__(self) -> Display:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
