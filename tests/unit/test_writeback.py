"""Writeback started early during restore: which ranges are handed to the kernel, and that nothing
breaks where sync_file_range is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgvault import writeback
from pgvault.writeback import Writeback

MIB = 1024 * 1024


def test_the_kernel_exists_here_and_accepts_the_request(tmp_path: Path) -> None:
    assert writeback._sync_file_range is not None, "Linux's C library has sync_file_range"
    with open(tmp_path / "f", "wb") as out:
        out.write(b"x" * (2 * MIB))
        out.flush()
        assert writeback._sync_file_range(out.fileno(), 0, 2 * MIB, 2) == 0


def test_every_step_of_bytes_written_is_handed_over_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(writeback, "_sync_file_range", lambda *args: calls.append(args) or 0)
    tracker = Writeback(7, step=8 * MIB)
    for _ in range(20):
        tracker.wrote(MIB)
    assert calls == [(7, 0, 8 * MIB, 2), (7, 8 * MIB, 8 * MIB, 2)]  # the last 4 MiB are left to fsync


def test_without_sync_file_range_nothing_is_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(writeback, "_sync_file_range", None)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        tracker = Writeback(fd, step=1)
        tracker.wrote(10 * MIB)  # no error, no call
    finally:
        os.close(fd)
