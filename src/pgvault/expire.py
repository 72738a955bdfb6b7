"""expire and keep against a repository: gather the inventory, plan (retention.py), delete; pins.

The order of deletion leaves a correct repository wherever a crash interrupts it:

1. Debris of failed backups (`backup.remove_debris`).
2. The sentinels of every backup the plan deletes, in one batch: from then on none of them is valid
   (listed, restorable, counted by retention); whatever is left of them is debris, which the next
   `expire` or `backup` removes.
3. The rest of those backups' objects.
4. The WAL the plan deletes. WAL goes last: a crash before it leaves WAL nobody needs, never a valid
   backup without its WAL.

All of it, the planning included, runs under the backup lock (a backup being written has no
sentinel yet and would look like debris; its WAL is not in any plan yet) and the expire lock,
which `keep` also takes, so no pin can appear between planning and deleting. A dry run takes them
too: without the backup lock a backup in progress would be reported as debris.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgvault.backup import remove_debris
from pgvault.catalog import BackupRecord, Catalog
from pgvault.config import Policy
from pgvault.errors import ObjectExists, RepositoryError, UsageError
from pgvault.pg.wal import TimelineSwitch, is_archivable, is_history
from pgvault.repo import job_lock
from pgvault.repo.base import Storage
from pgvault.repo.layout import Layout
from pgvault.retention import BackupFacts, Inventory, Plan, plan_expiry

Progress = Callable[[str], None]
# Keys per Storage.delete call: bounded memory and steady progress (S3 batches by 1,000 itself).
DELETE_BATCH = 1000
_BACKUP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _quiet(_message: str) -> None:
    pass


def facts_of(record: BackupRecord) -> BackupFacts:
    return BackupFacts(id=record.id, timeline=record.timeline, start_lsn=record.start, stop_lsn=record.stop,
                       start_time=record.start_time, stop_time=record.stop_time, start_wal=record.start_wal,
                       stop_wal=record.stop_wal)


@contextmanager
def retention_locks(policy: Policy, storage: Storage) -> Iterator[None]:
    """The backup lock (expire never runs beside a backup), then the expire lock (nor beside keep)."""
    with job_lock(policy.repository, storage, policy.cluster, "backup"), \
            job_lock(policy.repository, storage, policy.cluster, "expire"):
        yield


# ---- gathering ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gathered:
    inventory: Inventory
    records: dict[str, BackupRecord]
    wal_sizes: dict[str, int]  # stored bytes per WAL file name


def gather(catalog: Catalog, segment_size: int) -> Gathered:
    records = {r.id: r for r in catalog.backups()}
    wal_sizes: dict[str, int] = {}
    histories: dict[int, Sequence[TimelineSwitch]] = {}
    for obj in catalog.storage.list(catalog.layout.wal_prefix):
        name = Layout.wal_name(obj.key)
        # Only what sits exactly where the layout puts it: deleting by name must hit this very object.
        if not is_archivable(name) or catalog.layout.wal_key(name) != obj.key:
            continue
        wal_sizes[name] = obj.size
        if is_history(name):
            histories[int(name[:8], 16)] = catalog.history(int(name[:8], 16))
    inventory = Inventory(backups=[facts_of(r) for r in records.values()], wal=sorted(wal_sizes),
                          histories=histories, pins=frozenset(catalog.pinned_ids()), segment_size=segment_size)
    return Gathered(inventory, records, wal_sizes)


# ---- expire -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpireResult:
    cluster: str
    plan: Plan
    dry_run: bool
    debris: tuple[str, ...]  # incomplete backups removed (or, in a dry run, that would be)
    records: dict[str, BackupRecord]
    freed_bytes: int  # stored bytes of the deleted backups and WAL (or that would be freed)

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan.as_dict()

        def row(backup_id: str) -> dict[str, Any]:
            record = self.records[backup_id]
            return {"id": backup_id, "stop_time": record.stop_time.isoformat(), "timeline": record.timeline,
                    "stored_size": record.stored_size}

        return {
            "cluster": self.cluster, "dry_run": self.dry_run, "now": plan["now"], "pitr_cutoff": plan["pitr_cutoff"],
            "kept": [{**row(k.id), "reasons": list(k.reasons)} for k in self.plan.kept],
            "deleted": [row(backup_id) for backup_id in self.plan.deleted],
            "wal_deleted": plan["wal_deleted"], "wal_deleted_files": plan["wal_deleted_files"],
            "wal_kept_files": plan["wal_kept_files"], "debris": list(self.debris),
            "stale_pins": plan["stale_pins"], "warnings": plan["warnings"], "freed_bytes": self.freed_bytes,
            "summary": plan["summary"],
        }


def run_expire(policy: Policy, storage: Storage, *, now: datetime, dry_run: bool = False,
               progress: Progress = _quiet) -> ExpireResult:
    """Plan retention for `now` and, unless dry_run, carry it out. Takes the backup lock itself."""
    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    with retention_locks(policy, storage):
        if dry_run:
            debris = catalog.incomplete_backups()
        else:
            debris = remove_debris(catalog)
            if debris:
                progress(f"expire: removed debris of incomplete backup(s): {', '.join(debris)}")
        gathered = gather(catalog, info.wal_segment_size)
        plan = plan_expiry(gathered.inventory, policy.retention, now)
        freed = (sum(gathered.records[i].stored_size for i in plan.deleted)
                 + sum(gathered.wal_sizes[name] for name in plan.deleted_wal))
        if not dry_run:
            apply_plan(catalog, plan, progress)
    return ExpireResult(policy.cluster, plan, dry_run, tuple(debris), gathered.records, freed)


def apply_plan(catalog: Catalog, plan: Plan, progress: Progress = _quiet) -> None:
    """Delete what the plan says, sentinels first. Call only under retention_locks."""
    storage, layout = catalog.storage, catalog.layout
    if plan.deleted:
        storage.delete([layout.sentinel_key(backup_id) for backup_id in plan.deleted])
        for backup_id in plan.deleted:
            keys = [obj.key for obj in storage.list(layout.backup_prefix(backup_id))]
            for start in range(0, len(keys), DELETE_BATCH):
                storage.delete(keys[start:start + DELETE_BATCH])
            progress(f"expire: deleted backup {backup_id}")
    keys = [layout.wal_key(name) for name in plan.deleted_wal]
    for start in range(0, len(keys), DELETE_BATCH):
        storage.delete(keys[start:start + DELETE_BATCH])
        progress(f"expire: deleted {min(start + DELETE_BATCH, len(keys))} of {len(keys)} WAL file(s)")


# ---- keep ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PinResult:
    backup_id: str
    pinned: bool  # whether the backup carries a pin now
    changed: bool  # whether this call placed or removed it

    def as_dict(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "pinned": self.pinned, "changed": self.changed}


def check_backup_id(backup_id: str) -> None:
    # The id becomes part of an object key: refuse anything that could name another place.
    if not _BACKUP_ID_RE.match(backup_id) or ".." in backup_id:
        raise UsageError(f"{backup_id!r} is not a backup id; give one as pgvault list shows it, "
                         "e.g. 20261120T020000Z")


def pin(policy: Policy, storage: Storage, backup_id: str, *, now: datetime) -> PinResult:
    """Protect a backup from expire (idempotent)."""
    check_backup_id(backup_id)
    catalog = Catalog(storage, policy.cluster)
    catalog.require_cluster_info()
    with job_lock(policy.repository, storage, policy.cluster, "expire"):
        if catalog.backup(backup_id) is None:
            raise RepositoryError(f"no backup {backup_id!r} in this repository", hint="pgvault list shows backup ids")
        body = json.dumps({"backup_id": backup_id, "pinned_at": now.isoformat()}, indent=2).encode()
        try:
            storage.put(catalog.layout.pin_key(backup_id), io.BytesIO(body))
        except ObjectExists:
            return PinResult(backup_id, pinned=True, changed=False)
    return PinResult(backup_id, pinned=True, changed=True)


def release(policy: Policy, storage: Storage, backup_id: str) -> PinResult:
    """Remove a backup's pin (idempotent); also works for a pin whose backup is gone."""
    check_backup_id(backup_id)
    catalog = Catalog(storage, policy.cluster)
    catalog.require_cluster_info()
    key = catalog.layout.pin_key(backup_id)
    with job_lock(policy.repository, storage, policy.cluster, "expire"):
        if storage.head(key) is not None:
            storage.delete([key])
            return PinResult(backup_id, pinned=False, changed=True)
        if catalog.backup(backup_id) is None:
            raise RepositoryError(f"no backup {backup_id!r} in this repository", hint="pgvault list shows backup ids")
    return PinResult(backup_id, pinned=False, changed=False)
