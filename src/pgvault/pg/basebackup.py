"""Taking a base backup over the replication protocol, and reading what the server says about it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from pgvault.errors import IntegrityError, PostgresError
from pgvault.pg.wal import Lsn, WalSegment
from pgvault.redaction import redact
from pgvault.streams import ChunkReader


@dataclass(frozen=True)
class Tablespace:
    oid: str
    location: str


class BaseBackupSession:
    """BASE_BACKUP over a replication connection: one tar archive per tablespace, then the manifest.

    This replaces a pg_basebackup subprocess: with `--pgdata=-` it can only stream a cluster without
    tablespaces, it waits without limit for WAL archiving, and it takes the conninfo on its command
    line. Here each tablespace arrives as its own archive in one stream, the server does not wait
    (WAIT false: pgvault waits, bounded, for the WAL in the repository), and the password stays in libpq.
    """

    def __init__(self, conninfo: str, *, application_name: str) -> None:
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        self._pq = pq
        dsn = make_conninfo(conninfo, replication="database", application_name=application_name)
        self._conn = pq.PGconn.connect(dsn.encode())
        if self._conn.status != pq.ConnStatus.OK:
            message = redact(self._conn.get_error_message().strip().splitlines()[0] if
                             self._conn.get_error_message().strip() else "connection failed")
            self._conn.finish()
            raise PostgresError(f"cannot open a replication connection: {message}",
                                hint="the role needs REPLICATION (or superuser), a pg_hba.conf line for the "
                                "conninfo's database, and a free max_wal_senders slot")
        self._pending: bytes | None = None  # the first message of the next archive or the manifest
        self._copy_done = False
        self.start_lsn: Lsn | None = None
        self.start_timeline = 0
        self.end_lsn: Lsn | None = None
        self.end_timeline = 0
        self.tablespaces: list[Tablespace] = []
        self.manifest = b""

    def close(self) -> None:
        self._conn.finish()

    def _error(self, what: str) -> PostgresError:
        detail = redact(self._conn.get_error_message().strip() or "unknown error")
        return PostgresError(f"{what}: {detail.splitlines()[0]}")

    def _result(self, expected: object) -> object:
        res = self._conn.get_result()
        if res is None or res.status != expected:
            message = res.get_error_message().strip() if res is not None else ""
            raise PostgresError(f"base backup failed: {redact(message.splitlines()[0]) if message else 'no result'}")
        return res

    def start(self, *, label: str, fast_checkpoint: bool) -> None:
        quoted = label.replace("'", "''")
        command = (f"BASE_BACKUP (LABEL '{quoted}', CHECKPOINT '{'fast' if fast_checkpoint else 'spread'}', "
                   "MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', WAIT false, TABLESPACE_MAP true)")
        try:
            self._conn.send_query(command.encode())
        except Exception:  # psycopg's pq raises OperationalError with libpq's message
            raise self._error("base backup failed to start") from None
        tuples = self._pq.ExecStatus.TUPLES_OK
        res = self._result(tuples)
        self.start_lsn = Lsn.parse(res.get_value(0, 0).decode())  # type: ignore[attr-defined]
        self.start_timeline = int(res.get_value(0, 1).decode())  # type: ignore[attr-defined]
        res = self._result(tuples)
        for row in range(res.ntuples):  # type: ignore[attr-defined]
            oid = res.get_value(row, 0)  # type: ignore[attr-defined]
            if oid is not None:  # the row with NULLs is the main data directory
                self.tablespaces.append(Tablespace(oid.decode(), res.get_value(row, 1).decode()))  # type: ignore[attr-defined]
        self._result(self._pq.ExecStatus.COPY_OUT)

    def _next_message(self) -> bytes | None:
        if self._pending is not None:
            message, self._pending = self._pending, None
            return message
        if self._copy_done:
            return None
        try:
            size, data = self._conn.get_copy_data(0)
        except Exception:  # psycopg's pq raises OperationalError with libpq's message
            raise self._error("base backup stream failed") from None
        if size == -1:
            self._copy_done = True
            return None
        if size == -2:
            raise self._error("base backup stream failed")
        return bytes(data)

    def _next_data(self) -> bytes | None:
        """The next data chunk of the current archive; None at its end (the next archive or manifest)."""
        while True:
            message = self._next_message()
            if message is None:
                return None
            kind = message[:1]
            if kind == b"d":
                return message[1:]
            if kind == b"p":  # progress report
                continue
            self._pending = message  # 'n' (new archive) or 'm' (manifest) belongs to the next reader
            return None

    def archives(self) -> Iterator[tuple[str, str | None, ChunkReader]]:
        """(archive name, tablespace location or None for the data directory, reader), in stream order.

        Read each archive to its end before asking for the next.
        """
        while True:
            message = self._next_message()
            if message is None:
                return
            kind = message[:1]
            if kind == b"n":
                fields = message[1:].split(b"\0")
                name, location = fields[0].decode(), fields[1].decode() if len(fields) > 1 else ""
                reader = ChunkReader(iter(self._next_data, None))
                yield name, location or None, reader
                while reader.read(1 << 20):  # drain whatever the consumer left
                    pass
            elif kind == b"m":
                chunks = []
                while (chunk := self._next_data()) is not None:
                    chunks.append(chunk)
                self.manifest = b"".join(chunks)
            elif kind != b"p":
                raise PostgresError(f"base backup stream sent an unknown message type {kind!r}")

    def finish(self) -> None:
        tuples = self._pq.ExecStatus.TUPLES_OK
        res = self._result(tuples)
        self.end_lsn = Lsn.parse(res.get_value(0, 0).decode())  # type: ignore[attr-defined]
        self.end_timeline = int(res.get_value(0, 1).decode())  # type: ignore[attr-defined]
        self._result(self._pq.ExecStatus.COMMAND_OK)
        while self._conn.get_result() is not None:
            pass


@dataclass(frozen=True)
class BackupLabel:
    start_lsn: Lsn
    start_wal: str
    checkpoint_lsn: Lsn
    timeline: int
    start_time: datetime | None
    # "BACKUP FROM: standby": the server was in recovery when the backup started. Read from the label,
    # not from pg_is_in_recovery() before it: a standby promoted in between took a primary's backup.
    from_standby: bool = False


_LABEL_START = re.compile(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$", re.M)
_LABEL_CHECKPOINT = re.compile(r"^CHECKPOINT LOCATION: ([0-9A-F]+/[0-9A-F]+)$", re.M)
_LABEL_TIMELINE = re.compile(r"^START TIMELINE: (\d+)$", re.M)
_LABEL_TIME = re.compile(r"^START TIME: (.+)$", re.M)
_LABEL_FROM = re.compile(r"^BACKUP FROM: (\w+)$", re.M)


def parse_label(data: bytes) -> BackupLabel:
    text = data.decode(errors="replace")
    start = _LABEL_START.search(text)
    checkpoint = _LABEL_CHECKPOINT.search(text)
    timeline = _LABEL_TIMELINE.search(text)
    if not (start and checkpoint and timeline):
        raise IntegrityError("the backup_label the server sent is not one pgvault can read")
    started = _LABEL_TIME.search(text)
    start_time = None
    if started:
        try:
            start_time = datetime.strptime(started.group(1).strip(), "%Y-%m-%d %H:%M:%S %Z")
        except ValueError:
            start_time = None
    source = _LABEL_FROM.search(text)
    return BackupLabel(Lsn.parse(start.group(1)), start.group(2), Lsn.parse(checkpoint.group(1)),
                       int(timeline.group(1)), start_time,
                       from_standby=bool(source and source.group(1) == "standby"))


@dataclass(frozen=True)
class WalRange:
    timeline: int
    start: Lsn
    end: Lsn


def manifest_wal_ranges(data: bytes) -> list[WalRange]:
    """The WAL a backup needs to become consistent, from PostgreSQL's own backup_manifest."""
    try:
        manifest = json.loads(data)
        return [WalRange(int(r["Timeline"]), Lsn.parse(r["Start-LSN"]), Lsn.parse(r["End-LSN"]))
                for r in manifest["WAL-Ranges"]]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the backup_manifest the server sent has no readable WAL-Ranges") from None


def backup_end(ranges: list[WalRange]) -> WalRange:
    """The range holding the backup's end point: the manifest lists the newest timeline first.

    Only a backup from a standby can have more than one: the standby followed a timeline switch
    (a failover of its primary) while the backup ran, and the backup ends on the new timeline.
    """
    if not ranges:
        raise IntegrityError("the backup_manifest the server sent has no WAL-Ranges")
    return ranges[0]


def needed_segments(ranges: list[WalRange], segment_size: int) -> list[WalSegment]:
    """The segments recovery reads to make the backup consistent, as recovery names them.

    For each segment number recovery takes the newest timeline that began at or before that
    segment (the segment holding a switch point comes from the new timeline, which carries the old
    timeline's WAL up to the switch); every range ends at its End-LSN - 1, so a range ending on a
    segment boundary does not need the next segment.
    """
    oldest_first = sorted(ranges, key=lambda r: r.timeline)
    if not oldest_first:
        raise IntegrityError("the backup_manifest the server sent has no WAL-Ranges")
    first = oldest_first[0].start.segment_number(segment_size)
    last = Lsn(max(oldest_first[-1].end.value - 1, 0)).segment_number(segment_size)
    segments = []
    for number in range(first, last + 1):
        timeline = max(r.timeline for r in oldest_first if r.start.segment_number(segment_size) <= number)
        segments.append(WalSegment(timeline, number, segment_size))
    return segments
