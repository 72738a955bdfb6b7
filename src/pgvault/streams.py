"""Streaming helpers: a file-like view of byte chunks, a spooling pipe between two threads, and
whole-object zstd for small objects."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from typing import IO


class ChunkReader:
    """A file-like view of an iterator of byte chunks (feeds a compressor's stream_reader, or tar).

    read(size) may return fewer than size bytes before the end (as a pipe does); b"" only at the end.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""
        self._offset = 0  # what was already read from _current

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            rest = [self._current[self._offset:], *self._chunks]
            self._current, self._offset = b"", 0
            return b"".join(rest)
        if size == 0:
            return b""
        while self._offset >= len(self._current):
            try:
                self._current, self._offset = next(self._chunks), 0
            except StopIteration:
                self._current, self._offset = b"", 0
                return b""
        if self._offset == 0 and len(self._current) <= size:
            # The common case (a server message read whole): hand it on without copying it.
            data, self._current = self._current, b""
            return data
        end = min(len(self._current), self._offset + size)
        data = self._current[self._offset : end]
        self._offset = end
        return data


READ_LIMIT = 1024 * 1024  # bytes a SpoolPipe.read copies at once (from memory or the spill file)


class PipeClosed(Exception):
    """The other end of a SpoolPipe gave up (its error is reported by whoever owns that end)."""


class SpoolPipe:
    """One writer thread, one reader thread: the bytes written, read in order, as they come.

    The writer never waits for the reader: up to memory_limit unread bytes stay in memory, the rest
    go to an anonymous temp file (removed by the kernel when closed, or when the process dies). So a
    slow reader (an upload) costs disk space for its backlog, not memory, and does not hold up the
    writer (the backup stream).
    """

    def __init__(self, memory_limit: int) -> None:
        self._limit = memory_limit
        self._cond = threading.Condition()
        # In order: bytes held in memory, or (offset, length) of bytes in the spill file.
        self._items: deque[bytes | tuple[int, int]] = deque()
        self._in_memory = 0
        self._head = 0  # bytes already read of the first item, when it is in memory
        self._file: IO[bytes] | None = None  # the spill file
        self._file_end = 0
        self._eof = False
        self._abandoned = False  # the reader is gone: writes fail
        self._error: BaseException | None = None  # the writer gave up: reads fail with PipeClosed
        self.spilled = 0  # bytes that went through the spill file (for tests and measurements)
        self.peak_memory = 0

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        with self._cond:
            if self._abandoned:
                raise PipeClosed("the reader of this pipe stopped")
            if self._eof:
                raise ValueError("write to a closed pipe")
            if self._in_memory + len(data) <= self._limit:
                self._items.append(data)
                self._in_memory += len(data)
                self.peak_memory = max(self.peak_memory, self._in_memory)
            else:
                self._items.append(self._spill(data))
            self._cond.notify_all()
        return len(data)

    def _spill(self, data: bytes) -> tuple[int, int]:
        if self._file is None:
            # Writes and reads use explicit offsets (pwrite/pread), under the lock like everything else.
            self._file = tempfile.TemporaryFile(prefix="pgvault-spool-")  # noqa: SIM115 (closed by abandon)
        fd = self._file.fileno()
        offset = self._file_end
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, self._file_end)
            self._file_end += written
            view = view[written:]
        self.spilled += len(data)
        return offset, len(data)

    def close(self) -> None:
        """The writer is done: the reader gets b"" after the last byte."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer gives up: the reader's next read raises PipeClosed (so an upload is abandoned)."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def abandon(self) -> None:
        """The reader gives up (or is done): the writer's next write raises PipeClosed; frees the spill."""
        with self._cond:
            self._abandoned = True
            self._items.clear()
            self._in_memory = self._head = 0
            if self._file is not None:
                self._file.close()
                self._file = None
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        """size bytes (everything when size < 0), fewer only at the end; waits for them, as a file would.

        A multipart upload asks for a whole chunk at once: handing it back as one object (built in place,
        see below) spares the caller joining pieces, which would hold the chunk twice.
        """
        first: bytes | None = None
        out: io.BytesIO | None = None
        taken = 0
        with self._cond:
            while size < 0 or taken < size:
                while not self._items and not self._eof and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    raise PipeClosed(f"the writer stopped: {self._error}")
                if not self._items:
                    break  # the end
                piece = self._take(READ_LIMIT if size < 0 else min(size - taken, READ_LIMIT))
                taken += len(piece)
                if first is None:
                    first = piece
                    continue
                if out is None:
                    # BytesIO grows its buffer in place and getvalue() hands that buffer over without a
                    # copy, so the answer costs its own size once, not twice as b"".join(pieces) would.
                    out = io.BytesIO()
                    out.write(first)
                out.write(piece)
        if out is not None:
            return out.getvalue()
        return first if first is not None else b""

    def _take(self, want: int) -> bytes:
        """The head of the queue, at most want bytes of it (called with the lock held)."""
        item = self._items[0]
        if isinstance(item, bytes):
            start = self._head
            count = min(len(item) - start, want)
            self._in_memory -= count
            if start + count == len(item):
                self._items.popleft()
                self._head = 0
                return item if start == 0 else item[start:]
            self._head += count
            return item[start : start + count]
        offset, length = item
        count = min(length, want)
        assert self._file is not None
        data = os.pread(self._file.fileno(), count, offset)
        if len(data) != count:
            raise OSError(f"spool file returned {len(data)} of {count} bytes")
        if count == length:
            self._items.popleft()
        else:
            self._items[0] = (offset + count, length - count)
        return data

    def readable(self) -> bool:
        return True


def compress(data: bytes, level: int) -> bytes:
    """One zstd frame with a content checksum (WAL segments, manifests: objects that fit in memory)."""
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data)
