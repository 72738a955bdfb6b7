"""Patroni's hooks into the repository: the custom bootstrap method and the replica creation method.

`pgvault patroni-bootstrap` (bootstrap.method: pgvault) builds a new cluster from the repository:
restore to the target, recover and promote on a private socket with archiving on (so the new
timeline's history file goes to the repository), stop cleanly, and leave a data directory that
Patroni starts as an ordinary primary. Doing the recovery here rather than through Patroni's
recovery_conf means a target the archive cannot reach fails the bootstrap with pgvault's reason,
before Patroni ever registers a leader.

`pgvault patroni-replica` (create_replica_methods: [pgvault, basebackup]) restores the newest backup
on the leader's timeline and leaves a standby for Patroni to configure (standby.signal, no target).
It exits non-zero when the repository cannot give such a replica, and Patroni falls back to
pg_basebackup from the leader.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgvault.config import Policy
from pgvault.errors import PgvaultError, PostgresError, UsageError
from pgvault.pg.autoconf import read_auto_conf, set_auto_conf
from pgvault.pg.instance import LocalInstance, chown_to_db_user, find_bindir, free_port
from pgvault.pg.recovery import self_command
from pgvault.repo.base import Storage
from pgvault.targets import RecoveryTarget

Progress = Callable[[str], None]

# What the private recovery runs with, removed again before Patroni takes the data directory over:
# Patroni writes its own settings into postgresql.conf, and postgresql.auto.conf would override them.
_PRIVATE = ("listen_addresses", "port", "unix_socket_directories", "unix_socket_permissions", "hba_file",
            "ident_file", "archive_mode", "archive_command", "primary_conninfo", "primary_slot_name",
            "synchronous_standby_names", "cluster_name", "logging_collector", "log_destination")
_RECOVERY = ("restore_command", "recovery_target", "recovery_target_time", "recovery_target_lsn",
             "recovery_target_xid", "recovery_target_name", "recovery_target_inclusive",
             "recovery_target_timeline", "recovery_target_action", "recovery_end_command")


@dataclass(frozen=True)
class BootstrapResult:
    backup_id: str
    target: str
    timeline: int  # the new timeline the promoted cluster runs on
    history_archived: bool
    duration_s: float


def _empty_or_missing(datadir: Path) -> None:
    if datadir.exists() and (not datadir.is_dir() or any(datadir.iterdir())):
        raise UsageError(f"--datadir {datadir} exists and is not empty",
                         hint="Patroni calls the bootstrap method for a new data directory; move the old one aside")


def archive_command(config_path: Path) -> str:
    import shlex

    return " ".join(shlex.quote(p) for p in [*self_command(), "--config", str(config_path), "wal-push"]) + ' "%p"'


def _private_instance(datadir: Path, sockets: Path, hba: Path, bindir: Path, config_path: Path) -> LocalInstance:
    from pgvault.drill import ScratchInstance

    base = LocalInstance.existing(datadir, port=free_port(), bindir=bindir)
    set_auto_conf(datadir, {
        "listen_addresses": "", "unix_socket_directories": str(sockets), "unix_socket_permissions": "0700",
        "hba_file": str(hba), "ident_file": str(datadir / "pg_ident.conf"),
        # Archiving stays on: the promotion's history file and the new timeline's first segments must
        # reach the repository (with archive_mode off PostgreSQL would never mark them ready).
        "archive_mode": "on", "archive_command": archive_command(config_path),
        "primary_conninfo": "", "synchronous_standby_names": "", "cluster_name": "pgvault-bootstrap",
        "logging_collector": "off", "log_destination": "stderr",
    })
    return ScratchInstance(base.pgdata, base.port, base.bindir, base.log_path, socket_dir=sockets)


def _clean_auto_conf(datadir: Path) -> None:
    present = set(read_auto_conf(datadir))
    set_auto_conf(datadir, {}, remove=[name for name in (*_PRIVATE, *_RECOVERY) if name in present])
    for signal in ("recovery.signal", "standby.signal"):
        (datadir / signal).unlink(missing_ok=True)


def _wait_history_archived(instance: LocalInstance, timeline: int, timeout: float) -> bool:
    name = f"{timeline:08X}.history"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = instance.query("SELECT (SELECT last_archived_wal FROM pg_stat_archiver), "
                              "(SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name = %s)",
                              (f"{name}.ready",))
        if rows and (rows[0][0] == name or rows[0][1] == 0):
            return True
        time.sleep(0.5)
    return False


def run_patroni_bootstrap(policy: Policy, storage: Storage, config_path: Path, datadir: Path,
                          target: RecoveryTarget, *, backup_id: str | None = None,
                          progress: Progress) -> BootstrapResult:
    """Restore to target, recover and promote privately, stop cleanly: a primary for Patroni to start."""
    from pgvault.catalog import Catalog
    from pgvault.pg.waldump import waldump_path
    from pgvault.restore import RestoreRequest, restore

    started = time.monotonic()
    datadir = datadir.absolute()
    _empty_or_missing(datadir)
    info = Catalog(storage, policy.cluster).require_cluster_info()
    waldump = waldump_path(policy.postgres.bindir, info.pg_version)
    bindir = policy.postgres.bindir or find_bindir(info.pg_version // 10000)
    request = RestoreRequest(pgdata=datadir, target=target, backup_id=backup_id, config_path=config_path)
    result = restore(storage, policy, request, waldump=waldump, progress=progress)

    scratch = Path(tempfile.mkdtemp(prefix="pgvault-bootstrap-"))
    sockets = scratch / "sock"
    sockets.mkdir()
    hba = scratch / "pg_hba.conf"
    hba.write_text("# pgvault patroni-bootstrap: the socket directory is private\nlocal all all trust\n")
    chown_to_db_user(scratch)
    instance = _private_instance(datadir, sockets, hba, bindir, config_path)
    try:
        progress(f"patroni-bootstrap: recovering to {result.target} on a private socket")
        instance.start(timeout=3600)
        instance.wait_promoted(timeout=24 * 3600)
        # The end-of-recovery checkpoint may still run; a checkpoint makes pg_control name the new timeline.
        instance.query("CHECKPOINT")
        rows = instance.query("SELECT timeline_id FROM pg_control_checkpoint()")
        timeline = int(rows[0][0])
        progress(f"patroni-bootstrap: promoted on timeline {timeline}; waiting for its history file "
                 "to reach the repository")
        archived = _wait_history_archived(instance, timeline, 120)
        if not archived:
            progress(f"patroni-bootstrap: {timeline:08X}.history is not archived yet; PostgreSQL keeps "
                     "it ready and archives it once Patroni starts the server")
    except PgvaultError as exc:
        raise PostgresError(f"recovery of the restored copy failed: {exc.message}",
                            hint=f"the server log is {instance.log_path}") from exc
    finally:
        if instance.is_running():
            instance.stop("fast", timeout=600)
        shutil.rmtree(scratch, ignore_errors=True)
        # A failed recovery never ran recovery_end_command: stop the prefetch worker it started.
        from pgvault.prefetch import clean_spool

        with contextlib.suppress(Exception):
            clean_spool(config_path, datadir)
    _clean_auto_conf(datadir)
    progress(f"patroni-bootstrap: {datadir} is a primary on timeline {timeline} (from backup "
             f"{result.backup_id}, {result.target}); Patroni starts it")
    return BootstrapResult(backup_id=result.backup_id, target=result.target, timeline=timeline,
                           history_archived=archived, duration_s=round(time.monotonic() - started, 3))


def leader_timeline(connstring: str) -> int:
    """The timeline the leader runs on, by IDENTIFY_SYSTEM over a replication connection."""
    from psycopg import pq

    conn = pq.PGconn.connect((connstring + " replication=true connect_timeout=10").encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise PostgresError("cannot reach the leader: "
                                + (conn.error_message or b"").decode(errors="replace").strip())
        res = conn.exec_(b"IDENTIFY_SYSTEM")
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples < 1:
            raise PostgresError("IDENTIFY_SYSTEM failed on the leader: "
                                + (res.error_message or b"").decode(errors="replace").strip())
        value = res.get_value(0, 1)
        return int(value.decode()) if value else 0
    finally:
        conn.finish()


def run_patroni_replica(policy: Policy, storage: Storage, config_path: Path, datadir: Path,
                        connstring: str | None, *, progress: Progress) -> str:
    """Restore the newest backup that leads to the leader's timeline; a standby for Patroni to start.

    Returns the backup id. Raises (and Patroni falls back to basebackup) when the repository has no
    such backup, or the leader's timeline is not in the archive yet.
    """
    from pgvault.catalog import Catalog
    from pgvault.pg.waldump import waldump_path
    from pgvault.restore import RestoreRequest, restore
    from pgvault.targets import make_target

    datadir = datadir.absolute()
    _empty_or_missing(datadir)
    timeline: int | str = "latest"
    if connstring:
        timeline = leader_timeline(connstring)
        progress(f"patroni-replica: the leader is on timeline {timeline}")
    info = Catalog(storage, policy.cluster).require_cluster_info()
    waldump = waldump_path(policy.postgres.bindir, info.pg_version)
    target = make_target(timeline=timeline)  # type: ignore[arg-type]
    request = RestoreRequest(pgdata=datadir, target=target, config_path=config_path)
    result = restore(storage, policy, request, waldump=waldump, progress=progress)
    # A standby, not a targeted recovery: Patroni writes primary_conninfo and restore_command itself.
    _clean_auto_conf(datadir)
    signal = datadir / "standby.signal"
    signal.touch()
    chown_to_db_user(signal)
    progress(f"patroni-replica: {datadir} restored from backup {result.backup_id} as a standby")
    return result.backup_id
