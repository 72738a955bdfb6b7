"""Writeback started early: the kernel writes a file out while more of it is being written.

A restore writes gigabytes and fsyncs each file. Left alone, Linux starts writing dirty pages only
after 30 s or once 10 % of memory is dirty, so each fsync found the whole file still in memory and
the extracting thread waited, idle, while the disk wrote it (py-spy: half of a 2 GB restore's wall
time inside fsync). sync_file_range(SYNC_FILE_RANGE_WRITE) on each few MiB just written starts
their writeback without waiting for it (what PostgreSQL's *_flush_after settings do), so the disk
works while the CPU decompresses, and the fsync at the end finds little left. The fsync is still
what makes the file durable; where sync_file_range is missing this is a no-op.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

STEP = 8 * 1024 * 1024  # bytes written between requests: big enough for sequential writes
_SYNC_FILE_RANGE_WRITE = 2

_Call = Callable[[int, int, int, int], int]


def _load() -> _Call | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_sync_file_range = _load()


class Writeback:
    """Tracks what was written to one file descriptor and starts writing out every STEP bytes of it."""

    def __init__(self, fd: int, step: int = STEP) -> None:
        self._fd = fd
        self._step = step
        self._written = 0
        self._started = 0  # bytes whose writeback was requested

    def wrote(self, nbytes: int) -> None:
        self._written += nbytes
        if _sync_file_range is not None and self._written - self._started >= self._step:
            # The return value is ignored on purpose: a failure only loses the head start; the
            # caller's fsync still reports any real write error.
            _sync_file_range(self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = self._written
