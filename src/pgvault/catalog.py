"""What a repository holds: cluster identity, backup records (sentinels), archived WAL and timelines."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, ValidationError

from pgvault.errors import IntegrityError, ObjectExists, RepositoryError
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment, is_history, is_segment, parse_history
from pgvault.repo.base import Storage, read_verified
from pgvault.repo.layout import FORMAT_VERSION, Layout


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ClusterInfo(_Record):
    format: int = FORMAT_VERSION
    cluster: str
    system_id: str
    pg_version: int
    wal_segment_size: int
    created: datetime


class StoredObject(_Record):
    key: str
    size: int
    sha256: str


class PartRecord(StoredObject):
    index: int
    raw_size: int
    members: int
    tablespace: str | None = None  # the tablespace's OID; None for the data directory


class TablespaceRecord(_Record):
    oid: str
    name: str
    location: str


class BackupRecord(_Record):
    """The sentinel, backup.json: a backup exists for pgvault only once this is written."""

    format: int = FORMAT_VERSION
    id: str
    cluster: str
    system_id: str
    pg_version: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    checkpoint_lsn: str
    start_time: datetime
    stop_time: datetime
    start_wal: str
    stop_wal: str
    # The transaction id the next transaction would get, read just after the backup ended: any
    # xid at or above it committed after this backup became consistent.
    next_xid: int
    label: str
    parts: list[PartRecord]
    tablespaces: list[TablespaceRecord] = []
    data_directory: str | None = None  # where the backed-up cluster lived (guards tablespace restores)
    manifest: StoredObject
    raw_size: int
    stored_size: int
    duration_s: float
    compression: dict[str, str | int]
    annotations: dict[str, str] = {}
    pgvault_version: str
    # Taken from a streaming standby ("BACKUP FROM: standby" in its backup_label); None in records
    # of pgvault versions that did not say.
    from_standby: bool | None = None

    @property
    def stop(self) -> Lsn:
        return Lsn.parse(self.stop_lsn)

    @property
    def start(self) -> Lsn:
        return Lsn.parse(self.start_lsn)


@dataclass(frozen=True)
class ArchivedWal:
    """Segments present in the repository, per timeline, with the newest push time seen."""

    segments: dict[int, list[WalSegment]]
    histories: dict[int, list[TimelineSwitch]]


def read_json_object(storage: Storage, key: str) -> tuple[dict, int]:
    """Read a small JSON object, checking it against its recorded SHA-256."""
    data, _meta = read_verified(storage, key)
    try:
        return json.loads(data), len(data)
    except ValueError:
        raise IntegrityError(f"object {key} is not valid JSON") from None


class Catalog:
    """Read access to one cluster's area of a repository."""

    def __init__(self, storage: Storage, cluster: str) -> None:
        self.storage = storage
        self.layout = Layout(cluster)
        self.cluster = cluster

    # cluster.json -------------------------------------------------------------------------
    def cluster_info(self) -> ClusterInfo | None:
        if self.storage.head(self.layout.cluster_json) is None:
            return None
        data, _ = read_json_object(self.storage, self.layout.cluster_json)
        try:
            info = ClusterInfo.model_validate(data)
        except ValidationError:
            raise IntegrityError(f"{self.layout.cluster_json} is not a pgvault cluster record") from None
        if info.format != FORMAT_VERSION:
            raise RepositoryError(f"repository format {info.format} is not supported by this pgvault "
                                  f"(it reads format {FORMAT_VERSION}); upgrade pgvault")
        return info

    def require_cluster_info(self) -> ClusterInfo:
        info = self.cluster_info()
        if info is None:
            raise RepositoryError(f"cluster {self.cluster!r} is not initialized in this repository",
                                  hint="run pgvault init first")
        return info

    def write_cluster_info(self, info: ClusterInfo) -> None:
        payload = info.model_dump_json(indent=2).encode()
        try:
            self.storage.put(self.layout.cluster_json, io.BytesIO(payload))
        except ObjectExists:
            raise RepositoryError(f"{self.layout.cluster_json} appeared while initializing; run init again") from None

    # backups ------------------------------------------------------------------------------
    def backup_ids(self) -> Iterator[tuple[str, bool]]:
        """Every backup directory: (id, has sentinel)."""
        seen: dict[str, bool] = {}
        for obj in self.storage.list(self.layout.backups_prefix):
            rest = obj.key[len(self.layout.backups_prefix):]
            backup_id, _, name = rest.partition("/")
            if not name:
                continue
            seen[backup_id] = seen.get(backup_id, False) or name == "backup.json"
        yield from seen.items()

    def backup(self, backup_id: str) -> BackupRecord | None:
        key = self.layout.sentinel_key(backup_id)
        if self.storage.head(key) is None:
            return None
        data, _ = read_json_object(self.storage, key)
        try:
            record = BackupRecord.model_validate(data)
        except ValidationError:
            raise IntegrityError(f"{key} is not a valid backup record",
                                 hint="restore it from a copy of the repository, or use another backup") from None
        if record.format != FORMAT_VERSION:
            raise RepositoryError(f"{key} is repository format {record.format}; this pgvault reads format "
                                  f"{FORMAT_VERSION}", hint="use the pgvault version that wrote it")
        return record

    def backups(self) -> list[BackupRecord]:
        """Valid backups (those with a sentinel), ordered by stop LSN then stop time, never by name."""
        records = [rec for backup_id, done in self.backup_ids() if done
                   if (rec := self.backup(backup_id)) is not None]
        return sorted(records, key=lambda r: (r.stop.value, r.stop_time))

    def pinned_ids(self) -> set[str]:
        """Backup ids that `pgvault keep` pinned (expire never deletes them)."""
        prefix = self.layout.pins_prefix
        return {obj.key[len(prefix):].removesuffix(".json") for obj in self.storage.list(prefix)
                if obj.key.endswith(".json") and "/" not in obj.key[len(prefix):]}

    def incomplete_backups(self) -> list[str]:
        return [backup_id for backup_id, done in self.backup_ids() if not done]

    # WAL ----------------------------------------------------------------------------------
    def archived_wal(self, segment_size: int) -> ArchivedWal:
        segments: dict[int, list[WalSegment]] = {}
        histories: dict[int, list[TimelineSwitch]] = {}
        for obj in self.storage.list(self.layout.wal_prefix):
            name = Layout.wal_name(obj.key)
            if is_segment(name):
                seg = WalSegment.parse(name, segment_size)
                segments.setdefault(seg.timeline, []).append(seg)
            elif is_history(name):
                histories[int(name[:8], 16)] = self.history(int(name[:8], 16))
        for segs in segments.values():
            segs.sort()
        return ArchivedWal(segments, histories)

    def history(self, timeline: int) -> list[TimelineSwitch]:
        data, _meta = read_verified(self.storage, self.layout.wal_key(f"{timeline:08X}.history"))
        return parse_history(data.decode())
