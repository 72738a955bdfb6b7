"""DR drills: restore into a scratch instance, prove it works, and measure RTO and RPO.

A drill restores the repository (to a target time, or to the end of the archive) into a new
directory, starts it as a private PostgreSQL, waits for recovery to finish, runs pg_amcheck over
every database and the policy's own SQL checks, and reports how long it took and how much data the
restore would have lost. Whatever happens, the scratch instance is stopped and its directory removed
before the report is stored in the repository.

The scratch instance is reachable only through a Unix socket in a 0700 directory inside the scratch
directory (its TCP listener is off), so `trust` authentication there admits only root and the
database OS user, whatever the backed-up cluster's pg_hba.conf says.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgvault import __version__
from pgvault.catalog import BackupRecord, Catalog, read_json_object
from pgvault.config import DrillCheck, Policy
from pgvault.errors import ObjectExists, PgvaultError, PostgresError, TargetUnreachable
from pgvault.pg.instance import DB_SUPERUSER, LocalInstance, chown_to_db_user, find_bindir, free_port
from pgvault.pg.waldump import waldump_path
from pgvault.redaction import redact
from pgvault.repo.base import Storage
from pgvault.repo.layout import Layout

Progress = Callable[[str], None]

# Settings the scratch copy runs with, whatever the backed-up cluster had. Each prevents the copy
# from failing to start, hanging, or reaching out to the production systems it was copied from.
SCRATCH_SETTINGS = {
    "listen_addresses": "",  # no TCP: only the private socket directory (module docstring)
    "unix_socket_permissions": "0700",
    # The log goes to the scratch directory, not the original's log_directory or syslog, in a format
    # the drill can read the server's reason for a failure from.
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] ",
    "ssl": "off",  # certificates may live outside the data directory; a Unix socket needs no TLS
    "synchronous_standby_names": "",  # else every write after promotion (CREATE EXTENSION) waits forever
    "primary_conninfo": "",  # a backup taken from a replica must not stream from its old primary
    "max_logical_replication_workers": "0",  # enabled subscriptions would consume the production slots
    "cluster_name": "pgvault-drill",  # names the copy's processes in ps
    # Nothing reads the copy before promotion, and without hot standby recovery does not stop on
    # max_connections & co. being lower than the original's (its postgresql.conf may not be in the backup).
    "hot_standby": "off",
}
# Longest Unix socket path PostgreSQL accepts (sun_path is 108 bytes, including the NUL).
_MAX_SOCKET_PATH = 107
_OUTPUT_LIMIT = 4000  # characters of pg_amcheck output kept in the report


def _quiet(_message: str) -> None:
    pass


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    seconds: float
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 3), "ok": self.ok}


@dataclass
class CheckResult:
    name: str
    database: str
    expect: str
    got: str | None  # the first column of the first row as text; None for no row or NULL
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe_failure(self) -> str:
        if self.error is not None:
            return f"check {self.name!r} (database {self.database}) failed: {self.error}"
        got = "no row" if self.got is None else repr(self.got)
        return f"check {self.name!r} (database {self.database}): expected {self.expect!r}, got {got}"


@dataclass
class AmcheckResult:
    enabled: bool
    ok: bool | None = None  # None: enabled but did not run (the drill failed before it)
    exit_code: int | None = None
    databases: list[str] = field(default_factory=list)
    output: str = ""  # what pg_amcheck reported (corruption details), shortened

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DrillReport:
    id: str
    cluster: str
    started_at: datetime
    target_time: datetime | None
    target: str  # as a restore describes it
    finished_at: datetime | None = None
    backup: dict[str, Any] | None = None  # id, timeline, stop time and LSN, stored and raw bytes
    steps: list[StepResult] = field(default_factory=list)
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    rpo_reference: datetime | None = None  # the target, or the drill's start without one
    last_replayed_at: datetime | None = None  # the last transaction recovery replayed
    restored_bytes: int | None = None
    amcheck: AmcheckResult = field(default_factory=lambda: AmcheckResult(enabled=True))
    checks: list[CheckResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    scratch_dir: str | None = None
    cleaned_up: bool = False
    report_key: str | None = None  # where the report is stored; None until (or unless) it is

    @property
    def ok(self) -> bool:
        return not self.failures and self.cleaned_up

    def fail(self, message: str) -> None:
        self.failures.append(redact(message))

    def record_recovery(self, rto_seconds: float, last_replayed: datetime | None, backup: BackupRecord) -> None:
        """RTO as measured; RPO from the target (or the drill's start) back to the last replayed transaction."""
        self.rto_seconds = rto_seconds
        self.last_replayed_at = last_replayed
        self.rpo_reference = self.target_time or self.started_at
        # Nothing replayed after the backup: what committed before the backup began is surely there.
        recovered_to = last_replayed if last_replayed is not None else backup.start_time
        self.rpo_seconds = (self.rpo_reference - recovered_to).total_seconds()

    @contextlib.contextmanager
    def step(self, name: str, progress: Progress) -> Iterator[None]:
        progress(f"drill: {name}")
        started = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.steps.append(StepResult(name, time.monotonic() - started, ok))

    def as_dict(self) -> dict[str, Any]:
        def stamp(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        stored = self.backup or {}
        return {
            "id": self.id,
            "cluster": self.cluster,
            "ok": self.ok,
            "failures": list(self.failures),
            "started_at": stamp(self.started_at),
            "finished_at": stamp(self.finished_at),
            "target": self.target,
            "target_time": stamp(self.target_time),
            "backup": self.backup,
            "rto_seconds": _round(self.rto_seconds),
            "rpo_seconds": _round(self.rpo_seconds),
            "rpo_reference": stamp(self.rpo_reference),
            "last_replayed_at": stamp(self.last_replayed_at),
            "sizes": {"backup_stored_bytes": stored.get("stored_bytes"), "backup_raw_bytes": stored.get("raw_bytes"),
                      "restored_bytes": self.restored_bytes},
            "steps": [s.as_dict() for s in self.steps],
            "amcheck": self.amcheck.as_dict(),
            "checks": [c.as_dict() for c in self.checks],
            "scratch_dir": self.scratch_dir,
            "cleaned_up": self.cleaned_up,
            "report_key": self.report_key,
            "pgvault_version": __version__,
        }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


# ---- signals ------------------------------------------------------------------------------------

class _Interrupts:
    """Process-wide: whether a signal arrived, and whether cleanup is running and must not be cut."""

    installed = False
    pending = False
    shielded = False


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt, so run_drill cleans up and stops.

    Later signals are ignored: one is enough, and a second Ctrl-C must not cut the cleanup short. A
    signal that arrives while the scratch instance is being removed is raised once that is done.
    Only the main thread can take signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if _Interrupts.pending:
            return
        _Interrupts.pending = True
        if not _Interrupts.shielded:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Interrupts.installed, _Interrupts.pending = True, False
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _Interrupts.installed = False


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    was = _Interrupts.shielded
    _Interrupts.shielded = True
    arrived = _Interrupts.pending
    try:
        yield
    finally:
        _Interrupts.shielded = was
    if _Interrupts.installed and _Interrupts.pending and not arrived and not was:
        raise KeyboardInterrupt


# ---- the scratch instance -----------------------------------------------------------------------

@dataclass
class ScratchInstance(LocalInstance):
    """A LocalInstance reached through its private socket directory instead of 127.0.0.1."""

    socket_dir: Path | None = None

    def conninfo(self, dbname: str = "postgres") -> str:
        assert self.socket_dir is not None
        return make_conninfo(host=str(self.socket_dir), port=str(self.port), user=DB_SUPERUSER, dbname=dbname)


@dataclass(frozen=True)
class _Scratch:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    @property
    def hba(self) -> Path:
        return self.root / "pg_hba.conf"

    @property
    def policy(self) -> Path:
        return self.root / "policy.yaml"

    @property
    def tablespaces(self) -> Path:
        return self.root / "tablespaces"


def _make_scratch(base: Path | None) -> _Scratch:
    try:
        root = Path(tempfile.mkdtemp(prefix="pgvault-drill-", dir=base))
    except OSError as exc:
        where = base or tempfile.gettempdir()
        raise PgvaultError(f"cannot create the drill's scratch directory in {where}: {exc.strerror}",
                           hint="set drill.scratch_dir to an existing directory with room for the restored "
                           "cluster") from None
    scratch = _Scratch(root)
    socket_path = scratch.sockets / ".s.PGSQL.65535"
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        shutil.rmtree(root, ignore_errors=True)
        raise PgvaultError(f"the scratch directory {root} is too deep for a Unix socket path "
                           f"({len(str(socket_path))} > {_MAX_SOCKET_PATH} bytes)",
                           hint="set drill.scratch_dir to a shorter path")
    os.chmod(root, 0o700)
    scratch.sockets.mkdir(mode=0o700)
    scratch.hba.write_text("# pgvault drill: the socket directory is private; nothing else gets in\n"
                           "local all all trust\n")
    chown_to_db_user(root)
    return scratch


def _scratch_policy(policy: Policy, conninfo: str) -> dict[str, Any]:
    """The policy for the copy's restore_command: this cluster and repository, nothing else.

    Written from the policy in memory, so the copy restores from exactly the repository the drill
    checks and needs no access to the original policy file.
    """
    from pydantic import BaseModel, SecretStr

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {k: plain(v) for k, v in value if v is not None}
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, timedelta):
            return f"{int(value.total_seconds())}s"
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {"cluster": policy.cluster, "postgres": {"conninfo": conninfo}, "repository": plain(policy.repository)}


def _write_scratch_policy(scratch: _Scratch, policy: Policy, conninfo: str) -> None:
    import yaml

    from pgvault.config import parse_policy

    data = _scratch_policy(policy, conninfo)
    parse_policy(data, "the drill's scratch policy")  # what wal-fetch will load must load
    fd = os.open(scratch.policy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold S3 keys
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    chown_to_db_user(scratch.policy)


def _stop_scratch(scratch: _Scratch, bindir: Path | None) -> None:
    """Stop whatever postmaster runs on the scratch data directory, by pg_ctl, else by its pid."""
    pid_file = scratch.pgdata / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        bindir = bindir or find_bindir()
        LocalInstance(scratch.pgdata, 0, bindir, LocalInstance.default_log_path(scratch.pgdata)).stop(
            "immediate", timeout=60)
        return
    except PgvaultError:
        pass
    # pg_ctl failed: the postmaster we started is ours to kill; its children exit when it dies.
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise PostgresError(f"the scratch postmaster (pid {pid}) did not exit after SIGKILL")


def _cleanup(scratch: _Scratch | None, bindir: Path | None, report: DrillReport) -> None:
    if scratch is None:
        report.cleaned_up = True
        return
    try:
        _stop_scratch(scratch, bindir)
    except Exception as exc:  # cleanup goes on; the report says what was left
        report.fail(f"cleanup: the scratch instance on {scratch.pgdata} could not be stopped: {exc}")
        return
    try:
        # A recovery that failed never ran its recovery_end_command: stop the copy's wal-fetch
        # prefetch worker and remove its spool here.
        from pgvault.prefetch import clean_spool

        clean_spool(scratch.policy, scratch.pgdata)
    except Exception as exc:
        report.fail(f"cleanup: the scratch copy's WAL prefetch spool could not be removed: {exc}")
        return
    try:
        shutil.rmtree(scratch.root)
    except OSError as exc:
        report.fail(f"cleanup: the scratch directory {scratch.root} could not be removed: {exc}")
        return
    report.cleaned_up = True


def _directory_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    total += st.st_size
    return total


# ---- the steps ----------------------------------------------------------------------------------

class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.at = time.monotonic() + seconds

    def remaining(self, what: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise PgvaultError(f"the drill ran out of time (drill.timeout {self.total:.0f}s) before {what}",
                               hint="raise drill.timeout in the policy if the cluster needs longer to restore")
        return left


def _backup_summary(backup: BackupRecord) -> dict[str, Any]:
    return {"id": backup.id, "timeline": backup.timeline, "stop_time": backup.stop_time.isoformat(),
            "stop_lsn": backup.stop_lsn, "stored_bytes": backup.stored_size, "raw_bytes": backup.raw_size}


def _recover(instance: ScratchInstance, deadline: _Deadline) -> datetime | None:
    """Start the copy, wait until recovery ended and it answers queries; the last replayed commit."""
    instance.start(timeout=deadline.remaining("the restored instance started"))
    instance.wait_promoted(timeout=deadline.remaining("recovery finished"))
    # The replay timestamp survives promotion: the end time of the last transaction recovery replayed.
    rows = instance.query("SELECT pg_last_xact_replay_timestamp()")
    return rows[0][0] if rows else None


def _amcheck(instance: ScratchInstance, jobs: int, deadline: _Deadline) -> AmcheckResult:
    result = AmcheckResult(enabled=True)
    result.databases = [str(r[0]) for r in instance.query(
        "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")]
    assert instance.socket_dir is not None
    tool = instance.bindir / "pg_amcheck"
    if not tool.is_file():
        raise PostgresError(f"pg_amcheck not found in {instance.bindir}",
                            hint="install the PostgreSQL client programs of the cluster's version, or set "
                            "drill.amcheck: false")
    cmd = [str(tool), "--all", "--install-missing", "--host", str(instance.socket_dir), "--port", str(instance.port),
           "--username", DB_SUPERUSER, "--no-password", "--jobs", str(jobs)]
    # PG* variables meant for the production cluster must not redirect the check.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    timeout = deadline.remaining("pg_amcheck ran")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PgvaultError(f"pg_amcheck did not finish within the drill's remaining {timeout:.0f}s",
                           hint="raise drill.timeout in the policy") from None
    result.exit_code = proc.returncode
    output = "\n".join(part.strip() for part in (proc.stdout, proc.stderr) if part.strip())
    result.output = output[:_OUTPUT_LIMIT] + ("\n[...]" if len(output) > _OUTPUT_LIMIT else "")
    result.ok = proc.returncode == 0
    return result


def _amcheck_failure(result: AmcheckResult) -> str:
    # pg_amcheck exits 2 when it found corruption and 1 when it could not check.
    what = "found corruption" if result.exit_code == 2 else f"failed (exit {result.exit_code})"
    first = next((line.strip() for line in result.output.splitlines() if line.strip()), "")
    detail = f": {first}" if first else ""
    return f"pg_amcheck {what}{detail}"


def _run_check(instance: ScratchInstance, check: DrillCheck, deadline: _Deadline) -> CheckResult:
    result = CheckResult(check.name, check.database, check.expect, None, False)
    timeout_ms = max(1, int(deadline.remaining(f"check {check.name!r} ran") * 1000))
    try:
        with instance.connect(check.database) as conn:
            # Checks read: they prove what the restore holds, and must not change it for the next one.
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            conn.execute("SET default_transaction_read_only = on")
            cur = conn.execute(check.query)
            while cur.nextset():  # several statements: the last result counts, as with psql -c
                pass
            res = cur.pgresult
            if res is not None and res.ntuples and res.nfields:
                raw = res.get_value(0, 0)
                result.got = None if raw is None else bytes(raw).decode(conn.info.encoding)
    except (psycopg.Error, PostgresError) as exc:
        result.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return result
    result.ok = result.got == check.expect
    return result


def _with_server_reason(message: str) -> str:
    """Make the server's own reason for failing, from the log tail in message, the first line.

    That is the FATAL or PANIC of the startup process (recovery), else the first one that is not the
    server turning away our own connection attempts while it was not up.
    """
    _head, marker, tail = message.partition("\n--- last lines of ")
    if not marker:
        return message
    errors = [line for line in tail.splitlines()[1:] if "FATAL:" in line or "PANIC:" in line]
    startup = re.search(r"startup process \(PID (\d+)\)", tail)
    if startup:
        errors = [line for line in errors if f"[{startup.group(1)}] " in line] or errors
    errors = [line for line in errors if "the database system is" not in line]
    if not errors:
        return message
    reason = re.split(r"(?:FATAL|PANIC):", errors[0], maxsplit=1)[1].strip()
    return f"the server failed: {reason}\n{message}"


def _report_id(storage: Storage, layout: Layout, started: datetime) -> str:
    from pgvault.backup import new_backup_id  # the same UTC stamp ids backups get

    taken = {_report_name(o.key) for o in storage.list(layout.drills_prefix)}
    return new_backup_id(started, taken)


def _store(storage: Storage, layout: Layout, report: DrillReport) -> None:
    for _attempt in range(3):
        report.id = _report_id(storage, layout, report.started_at)
        key = layout.drill_report_key(report.id)
        report.report_key = key
        payload = json.dumps(report.as_dict(), indent=2).encode()
        try:
            storage.put(key, io.BytesIO(payload))
            return
        except ObjectExists:  # another drill took this id in the meantime
            continue
    raise PgvaultError(f"could not find a free report id under {layout.drills_prefix}")


# ---- the drill ----------------------------------------------------------------------------------

def _plan(view: Any, scratch: _Scratch, target: Any, *, refusable: bool) -> Any:
    from pgvault.restore import RestoreRequest, plan_restore

    try:
        return plan_restore(view, RestoreRequest(pgdata=scratch.pgdata, target=target, archive_mode="off"))
    except TargetUnreachable as exc:
        if refusable:
            raise _Refused(exc) from None
        raise


def _restore_copy(storage: Storage, policy: Policy, scratch: _Scratch, plan: Any, port: int, waldump: str,
                  progress: Progress) -> None:
    from pgvault.restore import RestoreRequest, restore

    _write_scratch_policy(scratch, policy, make_conninfo(host=str(scratch.sockets), port=str(port),
                                                         user=DB_SUPERUSER))
    # Tablespaces go inside the scratch directory, never back to the live cluster's places.
    spaces = {t.oid: scratch.tablespaces / t.oid for t in plan.backup.tablespaces}
    request = RestoreRequest(pgdata=scratch.pgdata, target=plan.target, backup_id=plan.backup.id,
                             archive_mode="off", config_path=scratch.policy, tablespace_map=spaces)
    restore(storage, policy, request, waldump=waldump, progress=progress)


def _scratch_instance(scratch: _Scratch, port: int, bindir: Path, progress: Progress) -> ScratchInstance:
    from pgvault.pg.autoconf import set_auto_conf

    conf = scratch.pgdata / "postgresql.conf"
    if not conf.exists():
        # Debian keeps it in /etc/postgresql: the copy runs on defaults plus postgresql.auto.conf.
        conf.write_text("# pgvault drill: the backup has no postgresql.conf\n")
        progress("drill: the backup has no postgresql.conf; the copy runs on PostgreSQL's defaults")
    base = LocalInstance.existing(scratch.pgdata, port=port, bindir=bindir)
    set_auto_conf(scratch.pgdata, {**SCRATCH_SETTINGS, "unix_socket_directories": str(scratch.sockets),
                                   "hba_file": str(scratch.hba)})
    return ScratchInstance(base.pgdata, base.port, base.bindir, base.log_path, socket_dir=scratch.sockets)


def _failed_step(report: DrillReport) -> str:
    return report.steps[-1].name if report.steps and not report.steps[-1].ok else "setup"


def run_drill(policy: Policy, storage: Storage, *, target_time: datetime | None = None,
              progress: Progress = _quiet) -> DrillReport:
    """Restore into a scratch instance, check it, measure RTO and RPO, clean up, store the report.

    Failures (a failed restore, a damaged backup or WAL segment, pg_amcheck findings, a check that
    differs) are in report.failures and make report.ok false; the report is stored in the repository
    either way. Raised instead, with nothing created or stored: a repository without this cluster,
    and a target_time the repository cannot reach (TargetUnreachable, as `restore` refuses it).
    KeyboardInterrupt (see interrupt_on_signals) stops the drill; the scratch instance is stopped
    and removed first, and no report is stored.
    """
    from pgvault.recoverable import Recoverable
    from pgvault.targets import make_target

    info = Catalog(storage, policy.cluster).require_cluster_info()
    started = datetime.now(UTC)
    clock = time.monotonic()
    deadline = _Deadline(policy.drill.timeout.total_seconds())
    target = make_target(time=target_time)
    report = DrillReport(id="", cluster=policy.cluster, started_at=started, target_time=target_time,
                         target=target.describe(), amcheck=AmcheckResult(enabled=policy.drill.amcheck))
    scratch: _Scratch | None = None
    bindir = policy.postgres.bindir
    try:
        try:
            scratch = _make_scratch(policy.drill.scratch_dir)
            report.scratch_dir = str(scratch.root)
            port = free_port()

            with report.step("plan", progress):
                waldump = waldump_path(policy.postgres.bindir, info.pg_version)
                plan = _plan(Recoverable(storage, policy.cluster, waldump), scratch, target,
                             refusable=target_time is not None)
                report.backup = _backup_summary(plan.backup)
                progress(f"drill: backup {plan.backup.id}, target {target.describe()}")

            with report.step("restore", progress):
                bindir = bindir or find_bindir(info.pg_version // 10000)
                _restore_copy(storage, policy, scratch, plan, port, waldump, progress)

            with report.step("recover", progress):
                deadline.remaining("the restored instance started")
                instance = _scratch_instance(scratch, port, bindir, progress)
                last = _recover(instance, deadline)
                report.record_recovery(time.monotonic() - clock, last, plan.backup)
                progress(f"drill: the copy answers queries after {report.rto_seconds:.1f}s (RTO); "
                         f"RPO {report.rpo_seconds:.1f}s")

            if policy.drill.amcheck:
                with report.step("amcheck", progress):
                    report.amcheck = _amcheck(instance, policy.restore.parallel, deadline)
                if not report.amcheck.ok:
                    report.fail(_amcheck_failure(report.amcheck))

            if policy.drill.checks:
                with report.step("checks", progress):
                    for check in policy.drill.checks:
                        progress(f"drill: check {check.name!r}")
                        result = _run_check(instance, check, deadline)
                        report.checks.append(result)
                        if not result.ok:
                            report.fail(result.describe_failure())

            with report.step("measure", progress):
                report.restored_bytes = _directory_bytes(scratch.pgdata, scratch.tablespaces)
        except _Refused:
            raise
        except PgvaultError as exc:
            report.fail(f"{_failed_step(report)}: {_with_server_reason(exc.message)}")
        except Exception as exc:  # a drill must end in a verdict, whatever broke
            report.fail(f"{_failed_step(report)}: unexpected {type(exc).__name__}: {exc}")
    except _Refused as refused:
        with _shielded():
            _cleanup(scratch, bindir, report)
        raise refused.error from None
    except BaseException:
        with _shielded():
            _cleanup(scratch, bindir, report)
        raise
    with _shielded(), report.step("cleanup", progress):
        _cleanup(scratch, bindir, report)
    report.finished_at = datetime.now(UTC)
    try:
        _store(storage, Layout(policy.cluster), report)
        progress(f"drill: report stored as {report.report_key}")
    except PgvaultError as exc:
        report.report_key = None
        report.fail(f"the report could not be stored: {exc.message}")
    return report


class _Refused(Exception):
    """The --target-time was refused while planning: raised again after cleanup, nothing stored."""

    def __init__(self, error: TargetUnreachable) -> None:
        super().__init__(error.message)
        self.error = error


def _report_name(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")


def latest_drill_report(storage: Storage, cluster: str) -> dict[str, Any] | None:
    """The newest stored drill report of cluster (ids are UTC stamps of the drill's start), or None.

    A damaged newest report raises IntegrityError rather than silently falling back to an older one.
    """
    layout = Layout(cluster)
    keys = [o.key for o in storage.list(layout.drills_prefix) if o.key.endswith(".json")]
    if not keys:
        return None
    newest = max(keys, key=_report_name)
    data, _size = read_json_object(storage, newest)
    return data
