"""wal-push and wal-fetch: moving single WAL files between pg_wal and the repository.

This runs once per segment as archive_command/restore_command, so it imports little.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from pgvault.errors import ConflictError, IntegrityError, ObjectExists, UsageError
from pgvault.pg.wal import (
    WalSegment,
    is_archivable,
    is_history,
    is_partial,
    is_segment,
    parse_long_header,
)
from pgvault.repo.base import Storage, read_verified
from pgvault.repo.layout import Layout
from pgvault.streams import compress, decompress


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    outcome: str  # "archived", "already archived", "replaced partial"
    raw_size: int
    stored_size: int
    raw_sha256: str  # of the bytes read from pg_wal: what the repository now holds (the look-ahead's marker)
    # The file's (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), the same before and after it was
    # read; None when it changed while read. A marker with it spares the fast path a re-hash.
    identity: tuple[int, int, int, int, int] | None = None


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes whenever a file's content does: any write moves mtime and ctime, a copy or a
    rename of another file into place changes the inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_segment(name: str, data: bytes, system_id: str, segment_size: int) -> None:
    """Refuse a segment that is not what its name says or belongs to another cluster."""
    base = name.removesuffix(".partial")
    if len(data) != segment_size:
        raise ConflictError(f"{name} is {len(data)} bytes, not the cluster's WAL segment size {segment_size}",
                            hint="archive_command must pass %p, the segment PostgreSQL hands it; this file is "
                            "truncated or not WAL")
    try:
        header = parse_long_header(data)
    except ValueError as exc:
        raise ConflictError(f"{name} is not a WAL segment: {exc}") from None
    if str(header.system_id) != system_id:
        raise ConflictError(
            f"{name} belongs to database system {header.system_id}, but this repository's cluster is "
            f"system {system_id}; refusing to mix two clusters' WAL",
            hint="check that archive_command passes this cluster's own --config",
        )
    segment = WalSegment.parse(base, segment_size)
    # The first segment of a new timeline starts as a copy of the parent's segment up to the switch
    # point, so its first page still carries the parent's (lower) timeline.
    if header.timeline > segment.timeline or header.page_address != segment.start_lsn:
        raise ConflictError(f"{name}'s header says timeline {header.timeline} at {header.page_address}; "
                            "the file was renamed or damaged")


def _stored_raw_sha256(storage: Storage, key: str) -> str:
    stored, _meta = read_verified(storage, key, hint="the stored segment is damaged; it cannot be compared, "
                                  "so nothing was archived")
    raw = stored if key.endswith(".history") else decompress(stored)
    return hashlib.sha256(raw).hexdigest()


def push(
    storage: Storage, layout: Layout, path: Path, *, system_id: str, segment_size: int, level: int
) -> PushResult:
    """Archive one file from pg_wal. Returns only once it is durable in the repository."""
    name = path.name
    if not is_archivable(name):
        raise UsageError(f"{name!r} is not a WAL file name; archive_command must pass %p")
    try:
        with open(path, "rb", buffering=0) as handle:
            before = file_identity(os.fstat(handle.fileno()))
            data = handle.readall()
            identity: tuple[int, int, int, int, int] | None = file_identity(os.fstat(handle.fileno()))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; archive_command must pass %p (run from the data directory)") from None
    if identity != before:
        identity = None
    if is_segment(name) or is_partial(name):
        check_segment(name, data, system_id, segment_size)
    raw_sha256 = hashlib.sha256(data).hexdigest()
    key = layout.wal_key(name)

    # No HEAD first: put refuses to overwrite (S3: If-None-Match, or its own check where conditional
    # writes are off; a directory: link()), and the rare segment pushed twice costs a compression,
    # where a HEAD would cost every segment a request.
    stored = data if is_history(name) else compress(data, level)
    extra = {"raw_sha256": raw_sha256, "raw_size": str(len(data))}
    try:
        meta = storage.put(key, io.BytesIO(stored), extra=extra)
    except ObjectExists:
        # Pushed before: a retry after a lost acknowledgement, another node, or different content.
        return replace(_resolve_existing(storage, key, name, data, raw_sha256, level, len(stored)),
                       identity=identity)
    return PushResult(name, key, "archived", len(data), meta.size, raw_sha256, identity)


def _resolve_existing(
    storage: Storage, key: str, name: str, data: bytes, raw_sha256: str, level: int, stored_size: int
) -> PushResult:
    meta = storage.head(key)
    recorded = meta.extra.get("raw_sha256") if meta is not None else None
    same = recorded == raw_sha256 if recorded else _stored_raw_sha256(storage, key) == raw_sha256
    if same:
        # A retry after a lost acknowledgement, or a second node: idempotent success.
        return PushResult(name, key, "already archived", len(data), meta.size if meta is not None else stored_size,
                          raw_sha256)
    if is_partial(name):
        # A .partial is a timeline's unfinished tail (promotion, pg_receivewal); a newer one must
        # never block archiving, and the complete segments are what recovery uses.
        stored = compress(data, level)
        meta = storage.put(key, io.BytesIO(stored), extra={"raw_sha256": raw_sha256,
                                                           "raw_size": str(len(data))}, overwrite=True)
        return PushResult(name, key, "replaced partial", len(data), meta.size, raw_sha256)
    raise ConflictError(
        f"{name} is already archived with different content; refusing to overwrite {key}",
        hint="two clusters may share this repository, or a restored cluster kept archiving: "
        "check archive_command's --config and the cluster's system id",
    )


# What recovery should do about a damaged object (the same words whether read whole or streamed).
_DAMAGED_HINT = ("recovery stops here rather than end early; put an intact copy of this segment in place (e.g. "
                 "from the primary's pg_wal) and start again")
_FETCH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FetchedWal:
    """One WAL file as written out by fetch_into: its raw (decompressed) size and SHA-256."""

    name: str
    raw_size: int
    raw_sha256: str


class _HashingReader:
    """The stored bytes of an object as they stream past: counted and hashed for the final check."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_FETCH_CHUNK):
            pass


def fetch_into(storage: Storage, layout: Layout, name: str, out: BinaryIO) -> FetchedWal:
    """Stream one archived WAL file into out, decompressed, in bounded memory (a chunk at a time).

    Checks the stored bytes against the object's recorded size and SHA-256 and the decompressed bytes
    against its raw SHA-256 (guarantee 4). The checks end only at the end of the stream, so on any
    error out holds garbage: the caller writes to a temporary file and discards it.
    Raises ObjectNotFound if the file was never archived, IntegrityError if it is damaged.
    """
    if not is_archivable(name):
        raise UsageError(f"{name!r} is not a WAL file name; restore_command must pass %f")
    import zstandard

    key = layout.wal_key(name)
    handle, meta = storage.open(key)
    raw_digest = hashlib.sha256()
    raw_size = 0
    with handle:
        stored = _HashingReader(handle)
        try:
            if is_history(name):
                while chunk := stored.read(_FETCH_CHUNK):
                    raw_digest.update(chunk)
                    raw_size += len(chunk)
                    out.write(chunk)
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(stored, read_size=_FETCH_CHUNK, closefd=False)
                while chunk := reader.read(_FETCH_CHUNK):
                    raw_digest.update(chunk)
                    raw_size += len(chunk)
                    out.write(chunk)
                stored.drain()  # anything after the frame is part of what the SHA-256 covers
        except zstandard.ZstdError as exc:
            # Damaged stored bytes usually fail to decompress first; name the checksum if it is that.
            stored.drain()
            _check_stored(key, stored, meta.size, meta.sha256)
            raise IntegrityError(f"object {key} does not decompress: {exc}", hint=_DAMAGED_HINT) from None
    _check_stored(key, stored, meta.size, meta.sha256)
    raw_sha256 = raw_digest.hexdigest()
    expected = meta.extra.get("raw_sha256")
    if expected and raw_sha256 != expected:
        raise IntegrityError(f"object {key} decompresses to other content than was archived", hint=_DAMAGED_HINT)
    return FetchedWal(name, raw_size, raw_sha256)


def _check_stored(key: str, stored: _HashingReader, size: int, sha256: str) -> None:
    if stored.size != size or stored.digest.hexdigest() != sha256:
        raise IntegrityError(f"object {key} does not match its recorded SHA-256; the repository is damaged",
                             hint=_DAMAGED_HINT)


def fetch(storage: Storage, layout: Layout, name: str, dest: Path) -> int:
    """Restore one WAL file to dest, verified. Raises ObjectNotFound if it was never archived.

    dest appears only complete and checked: the bytes go to a temporary name beside it first, which
    is removed again if anything fails.
    """
    if not is_archivable(name):
        raise UsageError(f"{name!r} is not a WAL file name; restore_command must pass %f")
    tmp = dest.with_name(f".{dest.name}.pgvault-tmp")
    try:
        with open(tmp, "wb") as out:
            fetched = fetch_into(storage, layout, name, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fetched.raw_size
