"""Progress of long commands: byte counts as a rich bar on a terminal, as timestamped lines elsewhere,
nothing with -q; plain callbacks (the scheduler's log) get messages only."""

from __future__ import annotations

import io
import re
import threading

import pytest
from rich.console import Console

from pgvault.progress import Display, meter

STAMP = r"\d\d:\d\d:\d\d"
MIB = 1024 * 1024


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_messages_are_timestamped_lines() -> None:
    out = io.StringIO()
    Display("lines", stream=out)("backup X: starting")
    assert re.fullmatch(f"{STAMP} backup X: starting", out.getvalue().rstrip("\n"))


def test_line_mode_prints_a_byte_count_at_most_every_interval_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    display = Display("lines", stream=out, interval=5.0, clock=clock)
    with display.meter("restore: extract", 100 * MIB) as done:
        for _ in range(30):  # 1 MiB every 0.25 s: one count at 5 s, not one per advance
            clock.now += 0.25
            done.advance(MIB)
        assert len(_lines(out)) == 1
        count = _lines(out)[0]
        # At 5 s: 20 MiB of 100 MiB at 4 MiB/s, so the other 80 MiB take 20 s more.
        assert re.fullmatch(f"{STAMP} restore: extract: 20.0 MiB of 100.0 MiB \\(20%\\), 4.0 MiB/s, "
                            "about 20 s left", count), count
        for _ in range(70):
            clock.now += 0.25
            done.advance(MIB)
    lines = _lines(out)
    assert len(lines) == 6  # at 5, 10, 15, 20 and 25 s, and the summary
    assert re.fullmatch(f"{STAMP} restore: extract: 100.0 MiB of 100.0 MiB \\(100%\\), 4.0 MiB/s", lines[-2])
    assert re.fullmatch(f"{STAMP} restore: extract: 100.0 MiB in 25.0 s \\(4.0 MiB/s\\)", lines[-1]), lines[-1]


def test_line_mode_without_a_total_counts_bytes_only() -> None:
    out, clock = io.StringIO(), Clock()
    with Display("lines", stream=out, interval=1.0, clock=clock).meter("backup X", None) as done:
        clock.now += 2
        done.advance(3 * MIB)
    assert re.fullmatch(f"{STAMP} backup X: 3.0 MiB, 1.5 MiB/s", _lines(out)[0]), _lines(out)


def test_a_step_shorter_than_the_interval_prints_no_count_and_no_summary() -> None:
    out, clock = io.StringIO(), Clock()
    with Display("lines", stream=out, interval=5.0, clock=clock).meter("backup X", 10 * MIB) as done:
        clock.now += 1
        done.advance(10 * MIB)
    assert out.getvalue() == ""


def test_line_mode_counts_every_byte_advanced_from_many_threads() -> None:
    out, clock = io.StringIO(), Clock()
    display = Display("lines", stream=out, interval=0.0, clock=clock)
    with display.meter("restore: verify", None) as done:
        workers = [threading.Thread(target=lambda: [done.advance(1024) for _ in range(1000)]) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        clock.now += 1
    assert _lines(out)[-1].endswith("restore: verify: 7.8 MiB in 1.0 s (7.8 MiB/s)"), _lines(out)[-1]


def test_bar_mode_draws_bytes_rate_and_eta_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Display("bar", console=console) as display:
        display("restore: extracting into /srv/pg")
        with display.meter("restore: extract", 8 * MIB) as done:
            for _ in range(8):
                done.advance(MIB)
    text = out.getvalue()
    assert "restore: extracting into /srv/pg" in text
    final = text.rsplit("\r", 1)[-1]  # rich redraws the bar in place; the last drawing is the finished one
    assert "restore: extract" in final
    assert "8.0/8.0 MiB" in final  # bytes done of the total
    assert re.search(r"\d+(\.\d+)? [kKMG]i?B/s", final), final  # the rate column (rich's, decimal units)
    assert re.search(r"\d:\d\d:\d\d", final), final  # the time-remaining column


def test_bar_mode_without_a_total_still_shows_bytes() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Display("bar", console=console) as display, display.meter("backup X", None) as done:
        done.advance(3 * MIB)
    assert "3.0/? MiB" in out.getvalue().rsplit("\r", 1)[-1]


def test_bar_ends_when_the_display_closes_even_if_a_meter_was_left_open() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    with Display("bar", console=console) as display:
        display.meter("backup X", 10).advance(5)  # never closed: an error escaped the core
    # rich allows one live display per console: a second bar starts only if the first one ended.
    with Display("bar", console=console) as again, again.meter("backup Y", 10) as done:
        done.advance(10)


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Display.for_stderr(quiet=True) as display:
        display("backup X: starting")
        with display.meter("backup X", 10) as done:
            done.advance(10)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_not_a_terminal_means_lines(capsys: pytest.CaptureFixture[str]) -> None:
    display = Display.for_stderr(quiet=False)  # pytest's captured stderr is no terminal
    assert display.mode == "lines"
    display("verify: WAL continuity")
    assert re.fullmatch(f"{STAMP} verify: WAL continuity\n", capsys.readouterr().err)


def test_a_plain_callback_gets_messages_but_no_byte_counts() -> None:
    seen: list[str] = []
    with meter(seen.append, "backup X", 100) as done:
        done.advance(100)
    assert seen == []
