"""`init` and `check`: binding a repository area to one PostgreSQL cluster, and proving archiving works."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgvault.catalog import Catalog, ClusterInfo
from pgvault.config import Policy
from pgvault.errors import PostgresError, RepositoryError
from pgvault.pg.conn import ServerFacts, connect, server_facts
from pgvault.repo.base import Storage

# PostgreSQL 15 brought the BASE_BACKUP option syntax and the single-stream archive protocol pgvault
# speaks (13 and 14 send one COPY per tablespace with another syntax).
MIN_VERSION = 150000


@dataclass
class CheckReport:
    cluster: str
    system_id: str
    pg_version: int
    checks: list[tuple[str, str]] = field(default_factory=list)  # (what, result)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "system_id": self.system_id, "pg_version": self.pg_version,
                "checks": [{"check": c, "result": r} for c, r in self.checks], "warnings": self.warnings}


def _archive_warnings(facts: ServerFacts) -> list[str]:
    warnings = []
    if facts.archive_mode == "off":
        warnings.append("archive_mode is off: set archive_mode=on (restart needed); backups need archived WAL")
    elif "wal-push" not in facts.archive_command:
        warnings.append(f"archive_command does not call pgvault wal-push ({facts.archive_command or 'empty'}); "
                        "set archive_command='pgvault --config FILE wal-push %p'")
    return warnings


def _require_usable(facts: ServerFacts) -> None:
    if facts.version_num < MIN_VERSION:
        raise PostgresError(f"PostgreSQL {facts.version_num // 10000} is too old; pgvault needs 15 or later")
    if facts.wal_level == "minimal":
        raise PostgresError("wal_level is minimal, which cannot be archived or backed up",
                            hint="set wal_level=replica and restart PostgreSQL")


def _probe_writable(storage: Storage, catalog: Catalog) -> None:
    key = catalog.layout.probe_key
    storage.put(key, io.BytesIO(b"pgvault write probe\n"), overwrite=True)
    storage.delete([key])


def init_cluster(policy: Policy, storage: Storage) -> tuple[ClusterInfo, bool, list[str]]:
    """Write cluster.json. Returns (info, created, warnings); idempotent for the same system."""
    with connect(policy.postgres.conninfo) as conn:
        facts = server_facts(conn)
    _require_usable(facts)
    catalog = Catalog(storage, policy.cluster)
    existing = catalog.cluster_info()
    if existing is not None:
        if existing.system_id != facts.system_id:
            raise RepositoryError(
                f"cluster {policy.cluster!r} in this repository belongs to database system {existing.system_id}, "
                f"but the server is system {facts.system_id}",
                hint="use another cluster name for this server, or another repository",
            )
        return existing, False, _archive_warnings(facts)
    _probe_writable(storage, catalog)
    info = ClusterInfo(cluster=policy.cluster, system_id=facts.system_id, pg_version=facts.version_num,
                       wal_segment_size=facts.wal_segment_size, created=datetime.now(UTC))
    catalog.write_cluster_info(info)
    return info, True, _archive_warnings(facts)


def check_cluster(policy: Policy, storage: Storage) -> CheckReport:
    """What `pgbackrest check` does: settings, repository, then a real WAL switch through the archive."""
    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    with connect(policy.postgres.conninfo) as conn:
        facts = server_facts(conn)
        report = CheckReport(policy.cluster, facts.system_id, facts.version_num)
        report.checks.append(("connection", "ok"))
        _require_usable(facts)
        if facts.system_id != info.system_id:
            raise RepositoryError(
                f"the server is database system {facts.system_id}, but cluster {policy.cluster!r} in the "
                f"repository is system {info.system_id}", hint="check postgres.conninfo and cluster")
        report.checks.append(("system id", facts.system_id))
        report.checks.append(("wal_level", facts.wal_level))
        if facts.archive_mode == "off":
            raise PostgresError("archive_mode is off, so no WAL reaches the repository",
                                hint="set archive_mode=on and archive_command='pgvault --config FILE wal-push %p',"
                                " then restart PostgreSQL")
        report.checks.append(("archive_mode", facts.archive_mode))
        report.warnings.extend(_archive_warnings(facts))
        _probe_writable(storage, catalog)
        report.checks.append(("repository writable", "ok"))
        if facts.in_recovery:
            report.warnings.append("the server is a standby: skipped the WAL switch test (run check on the "
                                   "primary)")
            return report
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        segment = str(row[0])
        key = catalog.layout.wal_key(segment)
        timeout = policy.archive.check_timeout.total_seconds()
        deadline = time.monotonic() + timeout
        while storage.head(key) is None:
            if time.monotonic() > deadline:
                failed = conn.execute(
                    "SELECT last_failed_wal, last_failed_time::text FROM pg_stat_archiver").fetchone()
                detail = ""
                if failed and failed[0]:
                    detail = f"; pg_stat_archiver: last failed {failed[0]} at {failed[1]}"
                raise RepositoryError(
                    f"WAL segment {segment} did not reach the repository within {int(timeout)} s: "
                    f"archiving is broken{detail}",
                    hint="look at the PostgreSQL log for archive_command errors, and run the archive_command "
                    "by hand as the database user",
                )
            time.sleep(0.2)
        report.checks.append(("WAL archived", segment))
    return report
