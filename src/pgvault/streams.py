"""Streaming helpers: a file-like view of byte chunks, and whole-object zstd for small objects."""

from __future__ import annotations

from collections.abc import Iterator


class ChunkReader:
    """A file-like view of an iterator of byte chunks (feeds a compressor's stream_reader, or tar)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._offset = 0  # what was already read from _buffer; compacted only when more is needed

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) - self._offset < size:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            if self._offset:
                del self._buffer[: self._offset]
                self._offset = 0
            self._buffer += chunk
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._offset + size)
        data = bytes(self._buffer[self._offset : end])
        self._offset = end
        if self._offset == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        return data


def compress(data: bytes, level: int) -> bytes:
    """One zstd frame with a content checksum (WAL segments, manifests: objects that fit in memory)."""
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data)
