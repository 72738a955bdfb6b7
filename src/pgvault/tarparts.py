"""A tar stream cut into independent parts at member boundaries, and their safe extraction.

Each part is a complete tar archive (its members, then the end-of-archive marker), so parts can be
compressed, stored, verified and extracted independently and in parallel, with memory bounded by
the read chunk size, never by the part or database size.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pgvault.errors import IntegrityError, UnsafeArchive
from pgvault.writeback import Writeback

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
CHUNK = 1024 * 1024
# Members pgvault reads itself: the manifest is stored as its own object; backup_label stays in
# its part too, since recovery needs it in the data directory.
CAPTURED = ("backup_manifest",)
COPIED = ("backup_label",)


def _member_size(header: bytes) -> int:
    field_ = header[124:136]
    if field_[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field_[1:], "big")
        return value
    text = field_.rstrip(b"\0 ").decode("ascii") or "0"
    return int(text, 8)


def _member_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
    return name


@dataclass
class PartStats:
    raw_size: int = 0
    members: int = 0
    sha256: str = ""


@dataclass
class TarSplitter:
    """Reads a tar stream and hands out parts of about part_size raw bytes each."""

    source: BinaryIO
    part_size: int
    # The SHA-256 of each part's raw tar bytes (PartStats.sha256). A backup records the stored bytes'
    # checksum only, and hashing every raw byte again cost ~0.9 s of CPU per 1.6 GB: it turns this off.
    hash_parts: bool = True
    captured: dict[str, bytes] = field(default_factory=dict)
    _pending: bytes | None = None  # a header read past the end of the previous part
    _done: bool = False

    def _read_exact(self, size: int) -> bytes:
        chunks = []
        remaining = size
        while remaining:
            chunk = self.source.read(remaining)
            if not chunk:
                raise IntegrityError("the base backup stream ended in the middle of a tar member")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _next_header(self) -> bytes | None:
        if self._pending is not None:
            header, self._pending = self._pending, None
            return header
        if self._done:
            return None
        first = self.source.read(BLOCK)
        if not first:
            self._done = True
            return None
        header = first if len(first) == BLOCK else first + self._read_exact(BLOCK - len(first))
        if header == b"\0" * BLOCK:
            self._done = True  # end-of-archive; drain what follows
            while self.source.read(CHUNK):
                pass
            return None
        return header

    def parts(self) -> Iterator[tuple[Iterator[bytes], PartStats]]:
        """Yield (chunks of one part, its stats); stats are complete once its chunks are consumed."""
        while True:
            header = self._next_header()
            if header is None:
                return
            name = _member_name(header)
            if name in CAPTURED:
                # Never start a part with a captured member: it could leave the part empty.
                padded = (_member_size(header) + BLOCK - 1) // BLOCK * BLOCK
                self.captured[name] = self._read_exact(padded)[: _member_size(header)]
                continue
            self._pending = header
            stats = PartStats()
            yield self._part_chunks(stats), stats

    def _part_chunks(self, stats: PartStats) -> Iterator[bytes]:
        digest = hashlib.sha256() if self.hash_parts else None

        def emit(data: bytes) -> bytes:
            if digest is not None:
                digest.update(data)
            stats.raw_size += len(data)
            return data

        while True:
            header = self._next_header()
            if header is None:
                break
            name = _member_name(header)
            size = _member_size(header)
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if name in CAPTURED:
                self.captured[name] = self._read_exact(padded)[:size]
                continue
            yield emit(header)
            if name in COPIED:
                body = self._read_exact(padded)
                self.captured[name] = body[:size]
                yield emit(body)
                stats.members += 1
                continue
            remaining = padded
            while remaining:
                chunk = self.source.read(min(CHUNK, remaining))
                if not chunk:
                    raise IntegrityError("the base backup stream ended in the middle of a tar member")
                remaining -= len(chunk)
                yield emit(chunk)
            stats.members += 1
            if stats.raw_size >= self.part_size:
                break
        yield emit(END_OF_ARCHIVE)
        stats.sha256 = digest.hexdigest() if digest is not None else ""


def _safe_target(root: Path, name: str) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UnsafeArchive(f"backup member {name!r} would be written outside the data directory")
    return root.joinpath(*path.parts)


@dataclass
class ExtractStats:
    files: int = 0
    bytes: int = 0
    skipped: int = 0


def extract(
    stream: BinaryIO,
    root: Path,
    *,
    owner: tuple[int, int] | None = None,
    unchanged: Callable[[str, int, Path], bool] | None = None,
) -> ExtractStats:
    """Extract one part into root, refusing anything that would land outside it (guarantee 8).

    unchanged(name, size, path) lets a delta restore skip files already identical on disk.
    """
    stats = ExtractStats()
    root_real = Path(os.path.realpath(root))
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            target = _safe_target(root, member.name)
            # A symlink planted by an earlier member must not redirect later writes.
            parent_real = Path(os.path.realpath(target.parent))
            if parent_real != root_real and root_real not in parent_real.parents:
                raise UnsafeArchive(f"backup member {member.name!r} would be written through a link "
                                    "outside the data directory")
            if member.isdir():
                # An earlier link member may stand where this directory goes; chmod would follow it.
                real = Path(os.path.realpath(target))
                if real != root_real and root_real not in real.parents:
                    raise UnsafeArchive(f"backup member {member.name!r} would be written through a link "
                                        "outside the data directory")
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(target, stat.S_IMODE(member.mode) or 0o700)
            elif member.isreg():
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if unchanged is not None and unchanged(member.name, member.size, target):
                    stats.skipped += 1
                    continue
                source = archive.extractfile(member)
                assert source is not None
                tmp = target.with_name(f".{target.name}.pgvault-tmp")
                with open(tmp, "wb") as out:
                    writeback = Writeback(out.fileno())
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                        out.flush()  # so the bytes are the kernel's when writeback is asked for
                        writeback.wrote(len(chunk))
                    os.fsync(out.fileno())
                os.chmod(tmp, stat.S_IMODE(member.mode) & 0o700 or 0o600)
                os.replace(tmp, target)
                stats.files += 1
                stats.bytes += member.size
            elif member.issym():
                link = PurePosixPath(member.linkname)
                resolved = PurePosixPath(os.path.normpath(PurePosixPath(member.name).parent / link))
                if link.is_absolute() or resolved.parts[:1] == ("..",):
                    raise UnsafeArchive(f"backup member {member.name!r} links outside the data directory "
                                        f"({member.linkname})")
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(member.linkname, target)
            else:
                kind = member.type.decode(errors="replace")
                raise UnsafeArchive(f"backup member {member.name!r} is a tar entry of type {kind!r}, "
                                    "which a data directory never holds")
            if owner is not None:
                os.lchown(target, *owner)
    return stats
