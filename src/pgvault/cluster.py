"""`init` and `check`: binding a repository area to one PostgreSQL cluster, and proving archiving works."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgvault.catalog import Catalog, ClusterInfo
from pgvault.config import Policy
from pgvault.errors import ConfigError, PostgresError, RepositoryError
from pgvault.pg.conn import ServerFacts, connect, server_facts
from pgvault.redaction import redact
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


PRIMARY_HINT = ("point postgres.primary_conninfo at the primary the standby replays from (with Patroni: the "
                "leader, e.g. through HAProxy's port for the primary)")


@contextmanager
def primary_connection(policy: Policy, standby: ServerFacts) -> Iterator[tuple[psycopg.Connection, ServerFacts]]:
    """A connection to postgres.primary_conninfo, checked to be a primary of the standby's system.

    A standby archives nothing (archive_mode=on archives on the primary only), so whatever must
    reach the repository now has to be switched out on the primary: a server in recovery, or one of
    another system, would accept pg_switch_wal() or refuse it without moving the standby's WAL.
    """
    conninfo = policy.postgres.primary_conninfo
    if conninfo is None:
        raise ConfigError("the server is a standby and postgres.primary_conninfo is not set")
    with ExitStack() as stack:
        try:
            conn = stack.enter_context(connect(conninfo))
            primary = server_facts(conn)
        except PostgresError as exc:
            # connect() and server_facts() name postgres.conninfo; this one is the primary's.
            what = exc.message.removeprefix("cannot connect to PostgreSQL: ")
            raise PostgresError(f"cannot use the primary (postgres.primary_conninfo): {what}",
                                hint="check postgres.primary_conninfo in the policy; its role needs to read "
                                "settings and run pg_switch_wal() (superuser, or pg_read_all_settings and "
                                "EXECUTE on pg_switch_wal)") from None
        if primary.in_recovery:
            raise PostgresError("postgres.primary_conninfo names a server in recovery (a standby), not the primary",
                                hint=PRIMARY_HINT)
        if primary.system_id != standby.system_id:
            raise PostgresError(f"postgres.primary_conninfo names database system {primary.system_id}, but the "
                                f"standby (postgres.conninfo) is system {standby.system_id}", hint=PRIMARY_HINT)
        yield conn, primary


def switch_wal(conn: psycopg.Connection, *, where: str = "") -> str:
    """pg_switch_wal(): the name of the segment it completed (archived next by the server's archiver)."""
    try:
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    except psycopg.Error as exc:
        detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise PostgresError(f"cannot switch WAL{where}: {detail}",
                            hint="the role needs superuser or EXECUTE on pg_switch_wal()") from None
    assert row is not None
    return str(row[0])


def _wait_archived(conn: psycopg.Connection, storage: Storage, catalog: Catalog, segment: str, timeout: float,
                   *, where: str = "") -> None:
    """Wait until the archiver of the server behind conn has put segment into the repository."""
    key = catalog.layout.wal_key(segment)
    deadline = time.monotonic() + timeout
    while storage.head(key) is None:
        if time.monotonic() > deadline:
            failed = conn.execute(
                "SELECT last_failed_wal, last_failed_time::text FROM pg_stat_archiver").fetchone()
            detail = ""
            if failed and failed[0]:
                detail = f"; pg_stat_archiver{where}: last failed {failed[0]} at {failed[1]}"
            raise RepositoryError(
                f"WAL segment {segment} did not reach the repository within {int(timeout)} s: "
                f"archiving is broken{detail}",
                hint=f"look at the PostgreSQL log{where} for archive_command errors, and run the "
                "archive_command by hand as the database user",
            )
        time.sleep(0.2)


def check_cluster(policy: Policy, storage: Storage) -> CheckReport:
    """What `pgbackrest check` does: settings, repository, then a real WAL switch through the archive.

    On a standby the switch happens on its primary (postgres.primary_conninfo), whose archiver is the
    one that fills the repository; without primary_conninfo that step is skipped and says so.
    """
    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    timeout = policy.archive.check_timeout.total_seconds()
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
        report.checks.append(("role", "standby (in recovery)" if facts.in_recovery else "primary"))
        report.checks.append(("wal_level", facts.wal_level))
        if facts.archive_mode == "off" and not facts.in_recovery:
            raise PostgresError("archive_mode is off, so no WAL reaches the repository",
                                hint="set archive_mode=on and archive_command='pgvault --config FILE wal-push %p',"
                                " then restart PostgreSQL")
        # On a standby archive_mode=on archives nothing (the primary does); it matters after a
        # failover, so a standby's own archive settings are warnings, never errors.
        report.checks.append(("archive_mode", facts.archive_mode))
        report.warnings.extend(_archive_warnings(facts))
        _probe_writable(storage, catalog)
        report.checks.append(("repository writable", "ok"))
        if not facts.in_recovery:
            segment = switch_wal(conn)
            _wait_archived(conn, storage, catalog, segment, timeout)
            report.checks.append(("WAL archived", segment))
            return report
    if policy.postgres.primary_conninfo is None:
        report.checks.append(("WAL archived", "not tested: the server is a standby, which archives nothing; set "
                              "postgres.primary_conninfo to test archiving through its primary (or run check "
                              "on the primary)"))
        return report
    on_primary = " on the primary"
    with primary_connection(policy, facts) as (primary_conn, primary):
        report.checks.append(("primary", f"system {primary.system_id}, not in recovery"))
        if primary.archive_mode == "off":
            raise PostgresError("archive_mode is off on the primary (postgres.primary_conninfo), so no WAL "
                                "reaches the repository",
                                hint="set archive_mode=on and archive_command='pgvault --config FILE wal-push %p' "
                                "on the primary, then restart it")
        report.checks.append(("primary archive_mode", primary.archive_mode))
        report.warnings.extend(f"on the primary: {warning}" for warning in _archive_warnings(primary))
        segment = switch_wal(primary_conn, where=on_primary)
        _wait_archived(primary_conn, storage, catalog, segment, timeout, where=on_primary)
        report.checks.append(("WAL archived", f"{segment} (switched on the primary)"))
    return report
