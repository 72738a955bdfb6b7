"""The storage protocol every backend implements. Backends know nothing of PostgreSQL.

Every object carries the SHA-256 and size of its stored bytes, computed by the backend while
it writes, so no caller can store an object without a checksum (guarantee 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ObjectMeta:
    """What the repository knows about one stored object."""

    size: int
    sha256: str
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float | None = None  # when the object was stored (Unix time), as the backend knows it


class Storage(Protocol):
    def put(
        self, key: str, data: BinaryIO, *, extra: Mapping[str, str] | None = None, overwrite: bool = False
    ) -> ObjectMeta:
        """Store data durably under key; return its size and SHA-256.

        Without overwrite, raise ObjectExists (and leave the stored object alone) if key exists.
        Returns only once the object and its metadata are durable.
        """
        ...

    def open(self, key: str) -> tuple[BinaryIO, ObjectMeta]:
        """Open key for reading; raise ObjectNotFound if absent."""
        ...

    def head(self, key: str) -> ObjectMeta | None:
        """The object's metadata, or None if it does not exist."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix, in key order."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete keys; missing keys are not an error."""
        ...

    def sweep(self, prefix: str) -> int:
        """Remove what killed writers left under prefix (temp files, unfinished uploads); return how many."""
        ...


def read_verified(storage: Storage, key: str, *, hint: str | None = None) -> tuple[bytes, ObjectMeta]:
    """Read a small object whole and check it against its recorded size and SHA-256 (guarantee 4)."""
    import hashlib

    from pgvault.errors import IntegrityError

    handle, meta = storage.open(key)
    with handle:
        data = handle.read()
    if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
        raise IntegrityError(f"object {key} does not match its recorded SHA-256; the repository is damaged",
                             hint=hint or "the object was damaged after it was written; restore it from a copy "
                             "of the repository")
    return data, meta
