"""Restoring a backup into a data directory and setting it up to recover to a target.

Everything that can be checked is checked before the first byte is written (guarantees 6 and 7):
the data directory, the backup, the target against the archived WAL, every part's checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from pgvault.catalog import BackupRecord, PartRecord, StoredObject
from pgvault.config import Policy
from pgvault.errors import DataDirectoryInUse, IntegrityError, TargetUnreachable, UsageError
from pgvault.pg import recovery
from pgvault.pg.wal import WalSegment
from pgvault.progress import meter
from pgvault.recoverable import XACT_KINDS, Recoverable
from pgvault.repo.base import Storage
from pgvault.streams import decompress
from pgvault.targets import RecoveryTarget
from pgvault.window import BackupReach, by_id, choose_for_lsn, choose_for_time

Progress = Callable[[str], None]
CHUNK = 1024 * 1024
T = TypeVar("T")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@dataclass(frozen=True)
class RestoreRequest:
    pgdata: Path
    target: RecoveryTarget = field(default_factory=RecoveryTarget)
    backup_id: str | None = None
    archive_mode: Literal["preserve", "off"] = "preserve"
    mode: Literal["new", "delta", "force"] = "new"
    config_path: Path | None = None
    # Check everything (data directory, target, every part's checksum) and report the plan; write nothing.
    dry_run: bool = False
    # Tablespace name or OID -> where to restore it; unmapped tablespaces go back to their original place.
    tablespace_map: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    pgdata: str
    target: str
    timeline: int
    settings: dict[str, str]
    tablespaces: dict[str, str]
    files_written: int
    files_unchanged: int
    bytes_written: int
    duration_s: float
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- the data directory -----------------------------------------------------------------------

def _postmaster_alive(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    except PermissionError:
        return -1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def check_data_directory(pgdata: Path, mode: str) -> None:
    if pgdata.exists() and not pgdata.is_dir():
        raise DataDirectoryInUse(f"--pgdata {pgdata} exists and is not a directory")
    if not pgdata.exists():
        return
    pid = _postmaster_alive(pgdata)
    if pid is not None:
        raise DataDirectoryInUse(
            f"--pgdata {pgdata} belongs to a running PostgreSQL (postmaster pid {pid})",
            hint="stop it first (pg_ctl -D DIR stop); pgvault never restores under a running server",
        )
    if mode == "new" and any(pgdata.iterdir()):
        raise DataDirectoryInUse(
            f"--pgdata {pgdata} is not empty",
            hint="choose an empty directory, or pass --delta to reuse matching files or --force to replace "
            "everything in it",
        )


def _owner_for(pgdata: Path) -> tuple[int, int] | None:
    """When root restores, files go to the data directory's owner (or postgres), as the server needs."""
    if os.geteuid() != 0:
        return None
    probe = pgdata
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = probe.stat()
    if st.st_uid != 0:
        return st.st_uid, st.st_gid
    try:
        user = pwd.getpwnam("postgres")
        return user.pw_uid, user.pw_gid
    except KeyError:
        return None


def _wipe(pgdata: Path) -> None:
    for entry in pgdata.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ---- choosing the backup and checking the target ------------------------------------------------

@dataclass(frozen=True)
class RestorePlan:
    reach: BackupReach
    timeline: int
    target: RecoveryTarget

    @property
    def backup(self) -> BackupRecord:
        return self.reach.backup


def plan_restore(view: Recoverable, request: RestoreRequest) -> RestorePlan:
    target = request.target
    if request.backup_id is not None and not any(b.id == request.backup_id for b in view.backups):
        raise TargetUnreachable(f"--backup {request.backup_id}: no such backup in this repository",
                                hint="pgvault list shows backup ids")
    pinned = next((b for b in view.backups if b.id == request.backup_id), None)
    timeline = view.resolve_timeline(target.timeline, pinned)
    reach = view.reach(timeline)
    if not reach:
        raise TargetUnreachable(f"no backup in the repository can be restored on timeline {timeline}",
                                hint="take one with pgvault backup; pgvault info shows what exists")
    if target.timeline == "current" and pinned is None:
        # 'current' means the chosen backup's timeline; the newest backup decides it.
        timeline = view.resolve_timeline("current", reach[-1].backup)
        reach = view.reach(timeline)
    chosen = _choose(view, reach, request)
    _check_reachable(view, chosen, target)
    return RestorePlan(chosen, timeline, target)


def _choose(view: Recoverable, reach: list[BackupReach], request: RestoreRequest) -> BackupReach:
    target = request.target
    if request.backup_id is not None:
        chosen = by_id(reach, view.backups, request.backup_id)
        _check_backup_before(chosen, target)
        return chosen
    if target.kind == "time":
        assert target.time is not None
        return choose_for_time(reach, target.time)
    if target.kind == "lsn":
        assert target.lsn is not None
        return choose_for_lsn(reach, target.lsn)
    if target.kind in ("xid", "name"):
        # Find the record itself in the archive so the backup can be chosen by its position.
        longest = max(reach, key=lambda r: r.wal_end.number)
        event = view.find_last(longest.wal, _event_matcher(target))
        if event is None:
            raise TargetUnreachable(f"{target.describe()} is not in the archived WAL "
                                    f"({longest.wal[0].name}..{longest.wal_end.name})",
                                    hint="check the name or xid; pgvault info shows the recoverable window")
        return choose_for_lsn(reach, event.lsn)
    return reach[-1]


def _event_matcher(target: RecoveryTarget) -> Callable[[Any], bool]:
    if target.kind == "name":
        return lambda e: e.kind == "RESTORE_POINT" and e.name == target.name
    # recovery_target_xid keeps only the low 32 bits of an epoch-qualified txid_current() value, and
    # pg_waldump prints the 32-bit xid: compare those.
    xid = (target.xid or 0) & 0xFFFFFFFF
    return lambda e: e.kind in XACT_KINDS and e.xid == xid


def _check_backup_before(chosen: BackupReach, target: RecoveryTarget) -> None:
    backup = chosen.backup
    if target.kind == "time" and target.time is not None and target.time < backup.stop_time:
        raise TargetUnreachable(f"{target.describe()} is before backup {backup.id} became consistent "
                                f"({backup.stop_time.isoformat(sep=' ', timespec='seconds')})",
                                hint="pick an older backup or drop --backup")
    if target.kind == "lsn" and target.lsn is not None and target.lsn < backup.stop:
        raise TargetUnreachable(f"{target.describe()} is before backup {backup.id} became consistent "
                                f"(LSN {backup.stop_lsn})", hint="pick an older backup or drop --backup")


def _check_reachable(view: Recoverable, chosen: BackupReach, target: RecoveryTarget) -> None:
    """Refuse targets beyond the archived WAL: PostgreSQL would fail only after the whole restore."""
    backup = chosen.backup
    stop_number = WalSegment.parse(backup.stop_wal, view.segment_size).number
    tail = [s for s in chosen.wal if s.number >= stop_number]
    if target.kind == "time":
        assert target.time is not None
        last = view.find_last(tail, lambda e: e.kind in XACT_KINDS)
        if last is None or last.time is None or last.time <= target.time or last.lsn < backup.stop:
            latest = (f"the last archived transaction ended at {last.time.isoformat(sep=' ')}"
                      if last is not None and last.time is not None and last.lsn >= backup.stop
                      else "no transaction was archived after the backup")
            raise TargetUnreachable(
                f"{target.describe()} is after the last archived WAL: {latest}",
                hint="recovery to this target would not complete; choose an earlier time, or restore "
                "without a target to recover everything archived",
            )
    elif target.kind == "lsn":
        assert target.lsn is not None
        latest = max(view.last_record_lsn(tail) or backup.stop, backup.stop)
        if target.lsn > latest:
            raise TargetUnreachable(f"{target.describe()} is after the last archived WAL record ({latest})",
                                    hint="choose an earlier LSN; pgvault info shows the recoverable window")
    elif target.kind in ("xid", "name"):
        event = view.find_last(tail, _event_matcher(target))
        if event is None or event.lsn < backup.stop:
            raise TargetUnreachable(f"{target.describe()} is not in the WAL after backup {backup.id}",
                                    hint="choose an older backup with --backup, or drop --backup")


# ---- reading and writing the parts ------------------------------------------------------------

class _HashingReader:
    """Reads a stored object while hashing it; at EOF checks size and SHA-256 against the record."""

    def __init__(self, handle: BinaryIO, record: StoredObject, advance: Callable[[int], None] | None = None) -> None:
        self._handle = handle
        self._record = record
        self._digest = hashlib.sha256()
        self._size = 0
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        self._size += len(data)
        if self._advance is not None and data:
            self._advance(len(data))
        if not data or (size < 0):
            self.check()
        return data

    def check(self) -> None:
        if self._size != self._record.size or self._digest.hexdigest() != self._record.sha256:
            raise IntegrityError(f"object {self._record.key} does not match the SHA-256 recorded in its backup",
                                 hint="the repository is damaged; nothing was written: restore another backup "
                                 "(--backup ID, see pgvault list)")


class _ReadAhead:
    """A stored object read (and hashed, and checked at its end) by a thread of its own, up to DEPTH
    chunks ahead of the consumer: fetching from the repository overlaps decompressing and writing."""

    DEPTH = 4  # chunks of CHUNK bytes: 4 MiB per part being extracted

    def __init__(self, handle: BinaryIO, record: StoredObject) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=self.DEPTH)
        self._stop = threading.Event()
        self._current = b""
        self._offset = 0
        self._ended = False
        self._thread = threading.Thread(target=self._fetch, args=(_HashingReader(handle, record),),
                                        name=f"pgvault-fetch-{record.key}", daemon=True)
        self._thread.start()

    def _fetch(self, source: _HashingReader) -> None:
        item: bytes | BaseException | None
        while True:
            try:
                data = source.read(CHUNK)  # checks size and SHA-256 when it reads the end
                item = data or None
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, BaseException) or self._stop.is_set():
                return

    def read(self, size: int = -1) -> bytes:
        if self._offset >= len(self._current):
            if self._ended:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if item is None:
                self._ended = True
                return b""
            self._current, self._offset = item, 0
        if size is None or size < 0:
            size = len(self._current) - self._offset
        data = self._current[self._offset : self._offset + size]
        self._offset += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Counting:
    """Passes reads through, telling a meter how many bytes went by."""

    def __init__(self, source: Any, advance: Callable[[int], None]) -> None:
        self._source = source
        self._advance = advance
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._source.read(size)
        if data:
            self.count += len(data)
            self._advance(len(data))
        return data

    def readable(self) -> bool:
        return True


def verify_object(storage: Storage, record: StoredObject, advance: Callable[[int], None] | None = None) -> None:
    handle, _meta = storage.open(record.key)
    with handle:
        reader = _HashingReader(handle, record, advance)
        while reader.read(CHUNK):
            pass


def _read_manifest(storage: Storage, record: StoredObject) -> bytes:
    """The backup's manifest, checked against the SHA-256 its sentinel recorded."""
    handle, _meta = storage.open(record.key)
    with handle:
        data = _HashingReader(handle, record).read()
    return decompress(data)


def _manifest_checksums(manifest: bytes) -> dict[str, tuple[int, str]]:
    files = json.loads(manifest).get("Files", [])
    return {f["Path"]: (int(f["Size"]), f.get("Checksum", "")) for f in files
            if f.get("Checksum-Algorithm") == "SHA256"}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_part(storage: Storage, part: PartRecord, pgdata: Path, owner: tuple[int, int] | None,
                  unchanged: Callable[[str, int, Path], bool] | None,
                  advance: Callable[[int], None] | None = None) -> tuple[int, int, int, set[str]]:
    import zstandard

    from pgvault import tarparts

    handle, _meta = storage.open(part.key)
    names: set[str] = set()
    with handle:
        fetched = _ReadAhead(handle, part)
        try:
            counted = _Counting(zstandard.ZstdDecompressor().stream_reader(fetched, read_across_frames=True),
                                advance or (lambda _n: None))

            def record_name(name: str, size: int, path: Path) -> bool:
                names.add(name)
                return unchanged(name, size, path) if unchanged else False

            stats = tarparts.extract(counted, pgdata, owner=owner, unchanged=record_name)  # type: ignore[arg-type]
            # Drain so the checksum covers every stored byte, not just what tar needed.
            while fetched.read(CHUNK):
                pass
            if advance is not None and part.raw_size > counted.count:
                advance(part.raw_size - counted.count)  # the end-of-archive padding tar did not read
        finally:
            fetched.close()
    return stats.files, stats.skipped, stats.bytes, names


def _reuse_freed_buffers() -> None:
    """Keep glibc from handing each freed 1 MiB buffer back to the kernel.

    Decompressing and unpacking allocates and frees buffers of up to 1 MiB by the thousand (zstd's
    reader, tarfile, each chunk read). glibc's default serves blocks above its (dynamic) threshold
    with mmap and trims the heap top above 2x that, so most came back as fresh zeroed pages: a 1.6 GB
    restore took 610 000 page faults and 3.9 s of system time. Fixed thresholds above those sizes let
    freed blocks be reused: 15 600 faults, 2.6 s, the same peak RSS (docs/benchmarks.md). Process-wide;
    a no-op where the C library has no mallopt.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)
    mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def _largest_first(parts: list[PartRecord], size: Callable[[PartRecord], int], parallel: int,
                   work: Callable[[PartRecord], T]) -> list[T]:
    """work(part) for every part, `parallel` at once, the biggest first (a big part started last would
    finish alone); results in the parts' order. The first failure cancels what has not started."""
    order = sorted(range(len(parts)), key=lambda i: size(parts[i]), reverse=True)
    results: dict[int, T] = {}
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-restore") as pool:
        futures = {pool.submit(work, parts[i]): i for i in order}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [results[i] for i in range(len(parts))]


def _remove_unlisted(pgdata: Path, keep: set[str]) -> None:
    """A delta restore leaves only what the backup has (old WAL of another timeline included)."""
    for dirpath, _dirnames, filenames in os.walk(pgdata, topdown=False):
        rel_dir = os.path.relpath(dirpath, pgdata)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in keep and rel != "backup_manifest":
                os.unlink(os.path.join(dirpath, name))


def tablespace_roots(backup: BackupRecord, request: RestoreRequest, pgdata: Path) -> dict[str, Path]:
    """Where each of the backup's tablespaces goes (OID -> directory), checked before writing."""
    by_key = {t.oid: t for t in backup.tablespaces} | {t.name: t for t in backup.tablespaces}
    for key in request.tablespace_map:
        if key not in by_key:
            have = ", ".join(f"{t.name} (OID {t.oid})" for t in backup.tablespaces) or "none"
            raise UsageError(f"--tablespace-map {key}: backup {backup.id} has no such tablespace (it has: {have})",
                             hint="name a tablespace by its name or OID")
    roots: dict[str, Path] = {}
    for space in backup.tablespaces:
        mapped = request.tablespace_map.get(space.name) or request.tablespace_map.get(space.oid)
        root = (mapped or Path(space.location)).absolute()
        if root == pgdata or pgdata in root.parents or root in pgdata.parents:
            raise UsageError(f"tablespace {space.name} would be restored to {root}, which overlaps --pgdata",
                             hint=f"map it elsewhere: --tablespace-map {space.name}=DIR")
        if root in roots.values():
            raise UsageError(f"two tablespaces would be restored to {root}", hint="map each to its own directory")
        if root.exists() and not root.is_dir():
            raise DataDirectoryInUse(f"tablespace {space.name}'s directory {root} exists and is not a directory")
        original = mapped is None and backup.data_directory and pgdata != Path(backup.data_directory)
        if original and request.mode != "new" and root.exists() and any(root.iterdir()):
            # --force/--delta on a copy beside the original would wipe the live cluster's tablespace.
            raise DataDirectoryInUse(
                f"tablespace {space.name} would be restored over its original directory {root}, but --pgdata is "
                f"not the original data directory ({backup.data_directory})",
                hint=f"if that is meant, say so: --tablespace-map {space.name}={root}; else map it elsewhere",
            )
        if request.mode == "new" and root.exists() and any(root.iterdir()):
            raise DataDirectoryInUse(
                f"tablespace {space.name}'s directory {root} is not empty",
                hint=f"restore it elsewhere with --tablespace-map {space.name}=DIR, or pass --delta/--force",
            )
        roots[space.oid] = root
    return roots


def _write_tablespace_map(pgdata: Path, roots: dict[str, Path], owner: tuple[int, int] | None) -> None:
    """PostgreSQL makes the pg_tblspc links from this file when recovery starts."""
    # A backslash escapes the next character; that is how a newline or backslash in a path survives.
    lines = [f"{oid} {str(root).replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + chr(10))}\n"
             for oid, root in sorted(roots.items())]
    path = pgdata / "tablespace_map"
    path.write_text("".join(lines))
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, *owner)


def _start_prefetch(policy: Policy, config_path: Path, pgdata: Path, first: str, segment_size: int,
                    progress: Progress) -> None:
    """wal-fetch's prefetch worker, started now so that recovery's first segments are in its spool
    before PostgreSQL asks (it otherwise starts after the first full wal-fetch). Only when this user
    is the one restore_command will run as: a spool made by root would be useless to postgres."""
    if policy.restore.prefetch == 0 or os.geteuid() == 0:
        return
    from pgvault import prefetch

    try:
        prefetch.seed(config_path, pgdata, first, segment_size)
    except OSError as exc:  # recovery works without it: the first wal-fetch starts one
        progress(f"restore: wal-fetch prefetch not started ahead of recovery: {exc}")


def restore(
    storage: Storage, policy: Policy, request: RestoreRequest, *, waldump: str, progress: Progress,
) -> RestoreResult:
    started = time.monotonic()
    pgdata = request.pgdata.absolute()
    check_data_directory(pgdata, request.mode)
    view = Recoverable(storage, policy.cluster, waldump)
    plan = plan_restore(view, request)
    backup = plan.backup
    roots = tablespace_roots(backup, request, pgdata)
    progress(f"restore: backup {backup.id} (timeline {backup.timeline}, consistent at {backup.stop_lsn}), "
             f"target {plan.target.describe()}")

    parallel = policy.restore.parallel
    _reuse_freed_buffers()
    progress(f"restore: verifying {len(backup.parts)} part(s) before writing anything")
    # Every part is read once here, in parallel, and again to extract it: nothing may be written before
    # all of them are known good (a part spooled locally instead would be written somewhere too).
    with meter(progress, "restore: verify", sum(p.size for p in backup.parts)) as checked:
        _largest_first(backup.parts, lambda p: p.size, parallel, lambda p: verify_object(storage, p, checked.advance))
    manifest = _read_manifest(storage, backup.manifest)
    assert request.config_path is not None
    settings = recovery.recovery_settings(plan.target, recovery.restore_command(request.config_path),
                                          archive_off=request.archive_mode == "off")
    if request.dry_run:
        progress("restore: dry run; every check passed and nothing was written")
        return RestoreResult(
            backup_id=backup.id, pgdata=str(pgdata), target=plan.target.describe(), timeline=plan.timeline,
            settings=settings, tablespaces={oid: str(root) for oid, root in roots.items()},
            files_written=0, files_unchanged=0, bytes_written=0,
            duration_s=round(time.monotonic() - started, 3), dry_run=True,
        )

    owner = _owner_for(pgdata)
    for directory in (pgdata, *roots.values()):
        if request.mode == "force" and directory.exists():
            _wipe(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if owner is not None:
            os.chown(directory, *owner)

    checksums = _manifest_checksums(manifest) if request.mode == "delta" else {}

    def extract(part: PartRecord) -> tuple[int, int, int, set[str]]:
        root = roots[part.tablespace] if part.tablespace else pgdata
        # The manifest names tablespace files by their path through pg_tblspc.
        prefix = f"pg_tblspc/{part.tablespace}/" if part.tablespace else ""

        def unchanged(name: str, size: int, path: Path) -> bool:
            known = checksums.get(prefix + name)
            return (known is not None and path.is_file() and path.stat().st_size == size == known[0]
                    and _file_sha256(path) == known[1])

        return _extract_part(storage, part, root, owner, unchanged if checksums else None, extracted.advance)

    progress(f"restore: extracting into {pgdata}" + "".join(f", {r}" for r in roots.values()))
    with meter(progress, "restore: extract", sum(p.raw_size for p in backup.parts)) as extracted:
        results = _largest_first(backup.parts, lambda p: p.raw_size, parallel, extract)
    written = sum(r[0] for r in results)
    skipped = sum(r[1] for r in results)
    nbytes = sum(r[2] for r in results)
    if request.mode == "delta":
        for oid, root in [(None, pgdata), *roots.items()]:
            kept = set().union(*(r[3] for r, p in zip(results, backup.parts, strict=True) if p.tablespace == oid))
            _remove_unlisted(root, kept)
    if roots:
        _write_tablespace_map(pgdata, roots, owner)

    manifest_path = pgdata / "backup_manifest"
    manifest_path.write_bytes(manifest)
    manifest_path.chmod(0o600)
    if owner is not None:
        os.chown(manifest_path, *owner)
    for empty in ("pg_wal", "pg_wal/archive_status"):
        (pgdata / empty).mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(pgdata / empty, *owner)

    recovery.write_recovery(pgdata, settings)
    os.sync()
    _start_prefetch(policy, request.config_path, pgdata, backup.start_wal, view.segment_size, progress)
    progress(f"restore: done; start PostgreSQL on {pgdata} to recover to {plan.target.describe()}")
    return RestoreResult(
        backup_id=backup.id, pgdata=str(pgdata), target=plan.target.describe(), timeline=plan.timeline,
        settings=settings, tablespaces={oid: str(root) for oid, root in roots.items()},
        files_written=written, files_unchanged=skipped, bytes_written=nbytes,
        duration_s=round(time.monotonic() - started, 3),
    )
