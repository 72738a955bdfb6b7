"""A repository in a local (or mounted) directory.

Each object is a plain file (readable with ordinary tools: `zstd -d`) plus a `<name>.meta`
JSON sidecar holding its SHA-256, size and extra metadata.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from pgvault.errors import ObjectExists, ObjectNotFound, RepositoryError
from pgvault.repo.base import ObjectInfo, ObjectMeta

META_SUFFIX = ".meta"
TMP_PREFIX = ".tmp."
CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise RepositoryError(f"invalid object key {key!r}")
        return self.root / key

    def _make_dirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing each new directory's parent so the entry itself is durable."""
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            fsync_dir(new.parent)

    def put(
        self, key: str, data: BinaryIO, *, extra: Mapping[str, str] | None = None, overwrite: bool = False
    ) -> ObjectMeta:
        path = self._path(key)
        try:
            self._make_dirs(path.parent)
            if not overwrite and path.exists():
                raise ObjectExists(f"object {key} already exists")
            suffix = f"{os.getpid()}.{secrets.token_hex(4)}"
            tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{suffix}")
            digest = hashlib.sha256()
            size = 0
            try:
                with open(tmp, "wb") as handle:
                    while chunk := data.read(CHUNK):
                        digest.update(chunk)
                        handle.write(chunk)
                        size += len(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
                meta = ObjectMeta(size=size, sha256=digest.hexdigest(), extra=dict(extra or {}))
                meta_tmp = path.with_name(f"{TMP_PREFIX}{path.name}{META_SUFFIX}.{suffix}")
                _write_durably(meta_tmp, json.dumps({"size": size, "sha256": meta.sha256,
                                                     "extra": dict(meta.extra)}).encode())
                if overwrite:
                    # Two replacing writers must not interleave data and sidecar: publish both under
                    # an flock on the directory (no-overwrite publishes need none: link() decides).
                    with _dir_lock(path.parent):
                        os.replace(tmp, path)
                        os.replace(meta_tmp, path.with_name(path.name + META_SUFFIX))
                        fsync_dir(path.parent)
                    return meta
                else:
                    # link() fails if the name exists: an atomic no-clobber publish, even against a
                    # concurrent writer of the same key.
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise ObjectExists(f"object {key} already exists") from None
                # The sidecar is renamed only by the writer whose data won the name.
                os.replace(meta_tmp, path.with_name(path.name + META_SUFFIX))
                fsync_dir(path.parent)
                return meta
            finally:
                for leftover in (tmp, path.with_name(f"{TMP_PREFIX}{path.name}{META_SUFFIX}.{suffix}")):
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
        except OSError as exc:
            raise RepositoryError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _read_meta(self, path: Path) -> ObjectMeta:
        try:
            raw = json.loads(path.with_name(path.name + META_SUFFIX).read_bytes())
            return ObjectMeta(size=int(raw["size"]), sha256=str(raw["sha256"]), extra=raw.get("extra") or {})
        except FileNotFoundError:
            # Data published but its sidecar not yet (a writer in flight, or one killed between the
            # two renames): the data file is complete (it was fsynced before link), so describe it.
            digest = hashlib.sha256()
            size = 0
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            return ObjectMeta(size=size, sha256=digest.hexdigest(), extra={})
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(f"metadata of {path} is unreadable; the repository is damaged") from None

    def open(self, key: str) -> tuple[BinaryIO, ObjectMeta]:
        path = self._path(key)
        try:
            meta = self._read_meta(path)
            return open(path, "rb"), meta
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} is not in the repository") from None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None

    def head(self, key: str) -> ObjectMeta | None:
        path = self._path(key)
        try:
            # The data file is the object; a sidecar left without it (the data deleted by hand or by
            # damage) describes nothing, and saying otherwise would make wal-push answer "already
            # archived" for a segment that is gone. put() then publishes the data and a new sidecar.
            os.stat(path)
            return self._read_meta(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        # os.walk yields a directory's files before its subdirectories' ('c/wal/x.history' before
        # 'c/wal/0000000100000000/...'); the protocol promises key order, as S3 lists, so sort.
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if name.startswith(TMP_PREFIX) or name.endswith(META_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                found.append(ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime))
        yield from sorted(found, key=lambda obj: obj.key)

    def sweep(self, prefix: str) -> int:
        """Remove temp files left under prefix by killed writers. Returns how many."""
        start = self.root / prefix
        if not start.is_dir():
            return 0
        removed = 0
        # Bottom-up, so a directory the sweep empties (a backup killed before its first part was
        # published) goes too; no listing would ever show it, so nothing else would remove it.
        for dirpath, _dirnames, filenames in os.walk(start, topdown=False):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
            if Path(dirpath) != start:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # fails, harmlessly, unless empty
        return removed

    def delete(self, keys: Iterable[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            path = self._path(key)
            for victim in (path.with_name(path.name + META_SUFFIX), path):
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise RepositoryError(f"cannot delete {victim}: {exc.strerror or exc}") from None
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            # Remove directories the delete emptied, never the root itself.
            probe = parent
            while probe != self.root and self.root in probe.parents:
                try:
                    probe.rmdir()
                except OSError:
                    break
                probe = probe.parent
