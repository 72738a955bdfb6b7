"""Taking a backup: the server's tar archives (one per tablespace) -> parts -> zstd -> repository -> sentinel.

The sentinel (backup.json) is written last, after every part, the manifest and the WAL the backup
needs to become consistent are in the repository (guarantee 3). A backup killed at any earlier
point leaves only debris without a sentinel, which is invisible and removed by the next backup.

From a streaming standby (pgBackRest's backup-standby) only the primary archives, so the backup's
last segment reaches the repository when the primary switches WAL: pgvault does that through
postgres.primary_conninfo, or says why it waits.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pgvault import __version__
from pgvault.catalog import BackupRecord, Catalog, ClusterInfo, PartRecord, StoredObject, TablespaceRecord
from pgvault.cluster import MIN_VERSION, primary_connection, switch_wal
from pgvault.config import Policy
from pgvault.errors import IntegrityError, ObjectExists, PgvaultError, PostgresError, RepositoryError
from pgvault.pg import basebackup
from pgvault.pg.conn import ServerFacts, connect, server_facts
from pgvault.pg.wal import Lsn, WalSegment
from pgvault.progress import Meter, meter
from pgvault.repo import job_lock
from pgvault.repo.base import ObjectMeta, Storage
from pgvault.streams import PipeClosed, SpoolPipe, compress
from pgvault.tarparts import PartStats, TarSplitter

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def new_backup_id(now: datetime, taken: set[str]) -> str:
    base = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def remove_debris(catalog: Catalog) -> list[str]:
    """Delete the remains of backups that never wrote a sentinel. Call only under the backup lock."""
    removed = []
    # A writer killed mid-put leaves temp files, which list() skips: sweep them first, or a killed
    # backup's directory never empties (and one killed before its first part is not even seen).
    catalog.storage.sweep(catalog.layout.backups_prefix)
    for backup_id in catalog.incomplete_backups():
        keys = [obj.key for obj in catalog.storage.list(catalog.layout.backup_prefix(backup_id))]
        catalog.storage.delete(keys)
        removed.append(backup_id)
    return removed


def wait_for_wal(storage: Storage, catalog: Catalog, segments: list[WalSegment], timeout: float, *,
                 why: str = "", hint: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    for segment in segments:
        key = catalog.layout.wal_key(segment.name)
        while storage.head(key) is None:
            if time.monotonic() > deadline:
                raise RepositoryError(
                    f"WAL segment {segment.name}, which this backup needs, did not reach the repository "
                    f"within {int(timeout)} s; the backup is not valid{why}",
                    hint=hint or "archiving is broken: run pgvault check and look at pg_stat_archiver and the "
                    "PostgreSQL log",
                )
            time.sleep(0.2)


# Why a standby backup without postgres.primary_conninfo waits, and how to avoid it.
STANDBY_WAIT = (" (the server is a standby: the primary archives that segment only when it switches to the next one, "
                "at the latest after its archive_timeout)")
STANDBY_HINT = ("set postgres.primary_conninfo so pgvault switches WAL on the primary after the backup, or make the "
                "primary's archive_timeout shorter than backup.wal_timeout")


def _check_source(policy: Policy, info: ClusterInfo, progress: Progress) -> ServerFacts:
    """Refuse a server pgvault cannot back up, before anything in the repository is touched."""
    with connect(policy.postgres.conninfo) as conn:
        facts = server_facts(conn)
    if facts.system_id != info.system_id:
        raise RepositoryError(
            f"the server is database system {facts.system_id}, but cluster {policy.cluster!r} in this "
            f"repository is system {info.system_id}",
            hint="point postgres.conninfo at the right server, or use another cluster name",
        )
    if facts.version_num < MIN_VERSION:
        raise PostgresError(f"PostgreSQL {facts.version_num // 10000} is too old; pgvault backs up 15 or later")
    archiver: ServerFacts | None = facts
    if facts.in_recovery:
        # A standby archives nothing itself (archive_mode=on archives on the primary only): its own
        # archive settings say nothing about this backup, the primary's do, if we can reach it.
        archiver = None
        if policy.postgres.primary_conninfo is not None:
            with primary_connection(policy, facts) as (_conn, primary):
                archiver = primary
            progress("the server is a standby; its primary (postgres.primary_conninfo) will switch WAL after "
                     "the backup")
    if archiver is not None and (archiver.archive_mode == "off" or archiver.wal_level == "minimal"):
        where = "the primary (postgres.primary_conninfo)" if archiver is not facts else "the server"
        raise PostgresError(
            f"{where} does not archive WAL (archive_mode=off or wal_level=minimal), so a backup "
            "could never be restored",
            hint="set wal_level=replica, archive_mode=on and archive_command='pgvault --config FILE "
            "wal-push %p', restart, then run pgvault check",
        )
    return facts


def _switch_on_primary(policy: Policy, standby: ServerFacts, storage: Storage, catalog: Catalog, last: WalSegment,
                       progress: Progress, backup_id: str) -> None:
    """Have the primary complete (and so archive) the standby backup's last segment, if it has not yet."""
    if storage.head(catalog.layout.wal_key(last.name)) is not None:
        return
    # Connected again, and checked again: a long backup may have outlived a failover.
    with primary_connection(policy, standby) as (conn, _primary):
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        if Lsn.parse(str(row[0])).segment_number(last.segment_size) > last.number:
            return  # the primary has moved past it: the segment is complete and its archiver has it
        switched = switch_wal(conn, where=" on the primary")
    progress(f"backup {backup_id}: switched WAL on the primary (completed {switched})")


def run_backup(
    policy: Policy, storage: Storage, *, annotations: dict[str, str] | None = None,
    progress: Progress = _quiet, now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> BackupRecord:
    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    facts = _check_source(policy, info, progress)
    with job_lock(policy.repository, storage, policy.cluster, "backup"):
        removed = remove_debris(catalog)
        if removed:
            progress(f"removed debris of incomplete backup(s): {', '.join(removed)}")

        started = now()
        clock = time.monotonic()
        taken = {backup_id for backup_id, _ in catalog.backup_ids()}
        backup_id = new_backup_id(started, taken)
        progress(f"backup {backup_id}: starting ({policy.backup.checkpoint} checkpoint"
                 f"{', from a standby' if facts.in_recovery else ''})")
        with connect(policy.postgres.conninfo) as conn:
            names = dict(conn.execute("SELECT oid::text, spcname FROM pg_tablespace").fetchall())
        streamed = _stream_backup(policy, storage, catalog, backup_id, progress)
        parts, captured = streamed.parts, streamed.captured

        with connect(policy.postgres.conninfo) as conn:
            # On a standby too: its snapshot is the primary's as replayed, taken after the stop point.
            row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
        next_xid = int(row[0]) if row else 0
        stop_time = now()

        label = basebackup.parse_label(captured["backup_label"])
        ranges = basebackup.manifest_wal_ranges(captured["backup_manifest"])
        stop_range = basebackup.backup_end(ranges)
        if streamed.end is not None and (streamed.end.value, streamed.end_timeline) != (
                stop_range.end.value, stop_range.timeline):
            raise IntegrityError(f"the server ended the backup at {streamed.end} on timeline {streamed.end_timeline}, "
                                 f"but its manifest's WAL ends at {stop_range.end} on timeline {stop_range.timeline}")
        seg_size = info.wal_segment_size
        needed = basebackup.needed_segments(ranges, seg_size)
        first_seg = WalSegment.parse(label.start_wal, seg_size)
        last_seg = needed[-1]
        why, hint = "", None
        if label.from_standby:
            if policy.postgres.primary_conninfo is not None:
                _switch_on_primary(policy, facts, storage, catalog, last_seg, progress, backup_id)
            elif storage.head(catalog.layout.wal_key(last_seg.name)) is None:
                why, hint = STANDBY_WAIT, STANDBY_HINT
                progress(f"backup {backup_id}: the server is a standby; waiting (up to backup.wal_timeout) for the "
                         f"primary to archive {last_seg.name}, which it does when it switches WAL, at the latest "
                         "after its archive_timeout. To avoid the wait, set postgres.primary_conninfo")
        progress(f"backup {backup_id}: waiting for WAL {first_seg.name}..{last_seg.name} in the repository")
        wait_for_wal(storage, catalog, needed, policy.backup.wal_timeout.total_seconds(), why=why, hint=hint)

        manifest_bytes = captured["backup_manifest"]
        manifest_meta = storage.put(
            catalog.layout.manifest_key(backup_id),
            io.BytesIO(compress(manifest_bytes, policy.compression.level)),
        )
        sentinel = BackupRecord(
            id=backup_id, cluster=policy.cluster, system_id=info.system_id, pg_version=facts.version_num,
            timeline=stop_range.timeline, start_lsn=str(label.start_lsn), stop_lsn=str(stop_range.end),
            checkpoint_lsn=str(label.checkpoint_lsn), start_time=started, stop_time=stop_time,
            start_wal=first_seg.name, stop_wal=last_seg.name, next_xid=next_xid,
            label=f"pgvault {backup_id}", parts=parts, data_directory=facts.data_directory,
            tablespaces=[TablespaceRecord(oid=t.oid, name=names.get(t.oid, t.oid), location=t.location)
                         for t in streamed.tablespaces],
            manifest=StoredObject(key=catalog.layout.manifest_key(backup_id), size=manifest_meta.size,
                                  sha256=manifest_meta.sha256),
            raw_size=sum(p.raw_size for p in parts) + len(manifest_bytes),
            stored_size=sum(p.size for p in parts) + manifest_meta.size,
            duration_s=round(time.monotonic() - clock, 3),
            compression={"type": "zstd", "level": policy.compression.level},
            annotations=dict(annotations or {}), pgvault_version=__version__,
            from_standby=label.from_standby,
        )
        try:
            storage.put(catalog.layout.sentinel_key(backup_id),
                        io.BytesIO(sentinel.model_dump_json(indent=2).encode()))
        except ObjectExists:
            raise RepositoryError(f"backup {backup_id} already has a sentinel; another writer is active") from None
        progress(f"backup {backup_id}: complete, {len(parts)} part(s)")
        return sentinel


@dataclass(frozen=True)
class _Streamed:
    parts: list[PartRecord]
    captured: dict[str, bytes]  # backup_label, tablespace_map and backup_manifest
    tablespaces: list[basebackup.Tablespace]
    end: Lsn | None  # where the server says the backup ended (BASE_BACKUP's last result)
    end_timeline: int


# Compressed bytes a backup holds in memory for its uploads, all parts in flight together; what an upload
# has not taken yet beyond that waits in a temp file (the page cache, mostly: it is read back soon). An
# S3 upload holds one or two multipart chunks besides. Peak RSS measured with 2 uploads: 85 MiB on a
# directory, 196 MiB on S3 (16 MiB chunks), whatever the part and database size (docs/benchmarks.md).
UPLOAD_BUFFER = 16 * 1024 * 1024


@dataclass
class _Upload:
    """One part on its way to the repository: compressed into pipe by the stream, stored by an uploader."""

    index: int
    key: str
    archive: str
    tablespace: str | None
    stats: PartStats
    pipe: SpoolPipe
    future: Future[ObjectMeta] = field(init=False)

    def record(self) -> PartRecord:
        meta = self.future.result()
        return PartRecord(index=self.index, key=self.key, raw_size=self.stats.raw_size, size=meta.size,
                          sha256=meta.sha256, members=self.stats.members, tablespace=self.tablespace)


def _upload(storage: Storage, key: str, pipe: SpoolPipe) -> ObjectMeta:
    try:
        meta = storage.put(key, pipe)  # type: ignore[arg-type]
        # put() returns only after reading to the end; a pipe still open means it stopped early.
        if pipe.read(1):
            raise RepositoryError(f"storing {key} ended before the end of its data")
        return meta
    finally:
        pipe.abandon()  # the stream's next write to it fails, and the spill file goes


def _expected_bytes(conninfo: str) -> int | None:
    """About how many bytes the stream will carry: every tablespace's size, as BASE_BACKUP's PROGRESS
    estimates it. None when the role may not ask (pg_tablespace_size needs pg_read_all_stats or CREATE)."""
    import psycopg

    try:
        with connect(conninfo) as conn:
            row = conn.execute("SELECT sum(pg_tablespace_size(oid))::bigint FROM pg_tablespace").fetchone()
    except (psycopg.Error, PgvaultError):
        return None
    return int(row[0]) if row and row[0] is not None else None


def _compress_part(chunks: Iterator[bytes], pipe: SpoolPipe, done: Meter, level: int, threads: int) -> None:
    """One zstd frame of a part's raw bytes into its pipe. The compressor is freed on return, before the
    next part's is made."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, write_checksum=True)
    # zstd's multi-threaded jobs default to 4 windows (8 MiB at level 3), and it buffers several per
    # worker: 76 MiB for 2 workers, 102 MiB for 4. One window (at least 2 MiB) per job measured 22 and
    # 29 MiB, the same speed and a ratio within 0.1 % (docs/benchmarks.md).
    job = max(2 * 1024 * 1024, 1 << params.window_log)
    params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, job_size=job,
                                                            write_checksum=True)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    for chunk in chunks:
        pipe.write(compressor.compress(chunk))
        done.advance(len(chunk))
    pipe.write(compressor.flush())


def _stream_backup(
    policy: Policy, storage: Storage, catalog: Catalog, backup_id: str, progress: Progress
) -> _Streamed:
    """Read the server's stream (this thread), compress each part (zstd's worker threads) and store the
    parts (up to backup.upload_parallel at once, the one being read included), so the upload of a part
    overlaps the reading of the next. The part records come back in index order."""
    session = basebackup.BaseBackupSession(policy.postgres.conninfo,
                                           application_name=f"pgvault-backup-{backup_id}")
    uploads: list[_Upload] = []
    captured: dict[str, bytes] = {}
    threads = policy.compression.threads or min(4, os.cpu_count() or 1)
    parallel = policy.backup.upload_parallel
    # Held by every part from its first byte until it is stored: at most `parallel` parts in flight.
    slots = threading.BoundedSemaphore(parallel)
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-upload")
    total = _expected_bytes(policy.postgres.conninfo)
    announce = _Stored(uploads, backup_id, progress)
    try:
        session.start(label=f"pgvault {backup_id}", fast_checkpoint=policy.backup.checkpoint == "fast")
        oids = {t.location: t.oid for t in session.tablespaces}
        with meter(progress, f"backup {backup_id}", total) as done:
            for archive_name, location, reader in session.archives():
                tablespace = oids.get(location) if location else None
                splitter = TarSplitter(reader, policy.backup.part_size, hash_parts=False)  # type: ignore[arg-type]
                for chunks, stats in splitter.parts():
                    _take_slot(slots, uploads)
                    index = len(uploads)
                    key = catalog.layout.part_key(backup_id, index)
                    pipe = SpoolPipe(UPLOAD_BUFFER // parallel)
                    future = announce.start(_Upload(index, key, archive_name, tablespace, stats, pipe),
                                            lambda upload: pool.submit(_upload, storage, upload.key, upload.pipe))
                    future.add_done_callback(lambda _f: slots.release())
                    try:
                        _compress_part(chunks, pipe, done, policy.compression.level, threads)
                    except PipeClosed:
                        future.result()  # the uploader's own error
                        raise RepositoryError(f"storing {key} stopped before the end of its data") from None
                    pipe.close()
                captured.update(splitter.captured)
        session.finish()
        captured["backup_manifest"] = session.manifest
        tablespaces = list(session.tablespaces)
        end, end_timeline = session.end_lsn, session.end_timeline
        for upload in uploads:
            upload.future.result()
    except BaseException as exc:
        # Stop every upload still going: each removes its temp file or aborts its multipart upload, as
        # a killed writer's would be; what was stored is debris without a sentinel (guarantee 3).
        for upload in uploads:
            upload.pipe.fail(exc)
        wait([upload.future for upload in uploads])
        raise
    finally:
        pool.shutdown(wait=True)
        session.close()
    if "backup_label" not in captured or not captured["backup_manifest"]:
        raise PostgresError("the base backup stream lacked its backup_label or manifest; is the server "
                            "PostgreSQL 15 or later?")
    return _Streamed([upload.record() for upload in uploads], captured, tablespaces, end, end_timeline)


class _Stored:
    """Says which parts are stored, in index order, as their uploads finish (from the uploader threads)."""

    def __init__(self, uploads: list[_Upload], backup_id: str, progress: Progress) -> None:
        self._uploads = uploads
        self._backup_id = backup_id
        self._progress = progress
        self._lock = threading.Lock()
        self._next = 0

    def start(self, upload: _Upload, submit: Callable[[_Upload], Future[ObjectMeta]]) -> Future[ObjectMeta]:
        """Start an upload and list it, under the lock the announcements take."""
        with self._lock:
            upload.future = submit(upload)
            self._uploads.append(upload)
        upload.future.add_done_callback(self._announce)
        return upload.future

    def _announce(self, _future: Future[ObjectMeta]) -> None:
        with self._lock:
            while self._next < len(self._uploads) and self._uploads[self._next].future.done():
                upload = self._uploads[self._next]
                self._next += 1
                if upload.future.exception() is not None:
                    return  # the stream raises it; later parts are never announced
                meta = upload.future.result()
                self._progress(f"backup {self._backup_id}: part {upload.index} of {upload.archive} stored "
                               f"({upload.stats.raw_size} bytes raw, {meta.size} stored)")


def _take_slot(slots: threading.BoundedSemaphore, uploads: list[_Upload]) -> None:
    """Wait until fewer than upload_parallel parts are in flight; raise an upload's failure at once."""
    while True:
        for upload in uploads:
            if upload.future.done() and upload.future.exception() is not None:
                upload.future.result()
        if slots.acquire(timeout=0.2):
            return
