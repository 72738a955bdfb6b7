"""The one place that runs a local PostgreSQL server.

Used by `pgvault demo`, by DR drills (start a restored data directory and check it) and by the test
fixtures. Every instance listens on 127.0.0.1 only and has Unix-domain sockets disabled: socket paths are
limited to ~107 bytes (deep temp dirs break them) and the Debian default /var/run/postgresql may be missing
or not writable, while TCP on loopback always works for psycopg and psql alike.

initdb, pg_ctl and postgres refuse to run as root, so when we are root they run as the `postgres` OS user
and every path they touch is chowned to it.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg.conninfo import make_conninfo

from pgvault.errors import PostgresError
from pgvault.pg.autoconf import set_auto_conf

DB_OS_USER = "postgres"
DB_SUPERUSER = "postgres"
LISTEN_ADDRESS = "127.0.0.1"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
BINDIR_ENV = "PGVAULT_PG_BINDIR"

_STOP_MODES = ("smart", "fast", "immediate")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_LOG_TAIL_LINES = 20


# --------------------------------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------------------------------


def _has_pg_ctl(bindir: Path) -> bool:
    return (bindir / "pg_ctl").is_file() and os.access(bindir / "pg_ctl", os.X_OK)


def _installed_versions() -> list[int]:
    """Major versions with server binaries under /usr/lib/postgresql, highest first."""
    if not DEBIAN_PG_ROOT.is_dir():
        return []
    versions = [
        int(entry.name)
        for entry in DEBIAN_PG_ROOT.iterdir()
        if entry.name.isdigit() and _has_pg_ctl(entry / "bin")
    ]
    return sorted(versions, reverse=True)


def _tool_major_version(tool: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(tool), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def find_bindir(version: int | None = None) -> Path:
    """Where initdb/pg_ctl/pg_waldump live.

    $PGVAULT_PG_BINDIR if set, else /usr/lib/postgresql/<version>/bin (the highest installed when
    version is None), else the directory of `pg_ctl` on PATH.
    """
    hint = (
        f"install the PostgreSQL server package (e.g. postgresql-{version or 15}) or set "
        f"{BINDIR_ENV} to the directory holding pg_ctl"
    )
    override = os.environ.get(BINDIR_ENV)
    if override:
        bindir = Path(override)
        if not _has_pg_ctl(bindir):
            raise PostgresError(f"{BINDIR_ENV}={override} has no executable pg_ctl", hint=hint)
        return bindir

    installed = _installed_versions()
    if version is None and installed:
        return DEBIAN_PG_ROOT / str(installed[0]) / "bin"
    if version is not None and version in installed:
        return DEBIAN_PG_ROOT / str(version) / "bin"

    on_path = shutil.which("pg_ctl")
    if on_path:
        bindir = Path(on_path).resolve().parent
        # A PATH pg_ctl of another major version would silently run the wrong server.
        if version is None or _tool_major_version(bindir / "pg_ctl") == version:
            return bindir

    wanted = f"PostgreSQL {version}" if version is not None else "PostgreSQL"
    raise PostgresError(f"cannot find the {wanted} server binaries (pg_ctl)", hint=hint)


def pg_tool(name: str, version: int | None = None) -> str:
    """Absolute path of a PostgreSQL tool in find_bindir()."""
    path = find_bindir(version) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PostgresError(
            f"PostgreSQL tool {name!r} not found in {path.parent}",
            hint=f"install the package that provides it or set {BINDIR_ENV}",
        )
    return str(path)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free now; racy by nature, good enough for throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LISTEN_ADDRESS, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# Running as the database OS user
# --------------------------------------------------------------------------------------------------


def _is_root() -> bool:
    return os.geteuid() == 0


def as_db_user(cmd: list[str]) -> list[str]:
    """Prefix cmd with `runuser -u postgres --` when we are root (server binaries refuse root)."""
    if not _is_root():
        return list(cmd)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", DB_OS_USER, "--", *cmd]


def _db_user_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(DB_OS_USER)
    except KeyError as exc:
        raise PostgresError(
            f"OS user {DB_OS_USER!r} does not exist",
            hint="running as root needs the postgres user (created by the PostgreSQL server package)",
        ) from exc
    return entry.pw_uid, entry.pw_gid


def chown_to_db_user(path: Path) -> None:
    """Recursively chown path to the postgres OS user when root; a no-op otherwise."""
    if not _is_root():
        return
    uid, gid = _db_user_ids()
    os.chown(path, uid, gid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _check_db_user_can_write(directory: Path) -> None:
    """Fail early with a useful hint when postgres cannot reach a directory (e.g. under a 0700 parent)."""
    if not _is_root():
        return
    probe = subprocess.run(
        as_db_user(["test", "-w", str(directory), "-a", "-x", str(directory)]),
        capture_output=True,
        cwd="/",
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        raise PostgresError(
            f"the {DB_OS_USER} OS user cannot write to {directory}",
            hint="every parent directory must be searchable by postgres (chmod o+x); "
            "pytest's tmp_path and /root are 0700",
        )


def _run(cmd: list[str], *, what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command (already wrapped by as_db_user if needed); PostgresError on failure."""
    try:
        # cwd="/" because the db user may not be able to enter our cwd (e.g. /root).
        return subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=timeout, check=True)
    except FileNotFoundError as exc:
        raise PostgresError(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise PostgresError(f"{what}: timed out after {timeout:.0f}s") from exc
    except subprocess.CalledProcessError as exc:
        output = "\n".join(part.strip() for part in (exc.stdout, exc.stderr) if part and part.strip())
        raise PostgresError(f"{what} failed (exit {exc.returncode}): {output}") from exc


def _base_settings(port: int) -> dict[str, str]:
    return {
        "listen_addresses": LISTEN_ADDRESS,
        "port": str(port),
        # Empty disables Unix sockets; see the module docstring.
        "unix_socket_directories": "",
    }


# --------------------------------------------------------------------------------------------------
# The instance
# --------------------------------------------------------------------------------------------------


@dataclass
class LocalInstance:
    """A PostgreSQL server on this machine, owned by pgvault, reachable on 127.0.0.1:port."""

    pgdata: Path
    port: int
    bindir: Path
    log_path: Path

    # -- construction -------------------------------------------------------------------------------

    @staticmethod
    def default_log_path(pgdata: Path) -> Path:
        # Outside pgdata so a base backup of the instance does not carry its own log.
        return pgdata.parent / f"{pgdata.name}.log"

    @classmethod
    def create(
        cls,
        pgdata: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        bindir: Path | None = None,
        initdb_options: list[str] | None = None,
    ) -> LocalInstance:
        """initdb a new cluster (trust auth, superuser postgres, checksums on) and configure it; no start."""
        pgdata = Path(pgdata).absolute()
        instance = cls(
            pgdata=pgdata,
            port=port if port is not None else free_port(),
            bindir=bindir if bindir is not None else find_bindir(),
            log_path=cls.default_log_path(pgdata),
        )
        if pgdata.exists() and any(pgdata.iterdir()):
            raise PostgresError(f"cannot initdb {pgdata}: directory exists and is not empty")
        pgdata.mkdir(parents=True, exist_ok=True)
        chown_to_db_user(pgdata)
        pgdata.chmod(0o700)
        _check_db_user_can_write(pgdata)

        _run(
            as_db_user(
                [
                    str(instance.bindir / "initdb"),
                    f"--pgdata={pgdata}",
                    f"--username={DB_SUPERUSER}",
                    "--auth=trust",
                    "--encoding=UTF8",
                    # Locale-independent: the environment's locale may not exist on this machine.
                    "--no-locale",
                    "--data-checksums",
                    # Throwaway clusters: skipping fsync makes initdb several times faster.
                    "--no-sync",
                    *(initdb_options or []),
                ]
            ),
            what=f"initdb {pgdata}",
            timeout=600,
        )
        set_auto_conf(pgdata, {**_base_settings(instance.port), **(settings or {})})
        return instance

    @classmethod
    def existing(cls, pgdata: Path, *, port: int | None = None, bindir: Path | None = None) -> LocalInstance:
        """Wrap an already-populated data directory (e.g. a restored one) and give it a port."""
        pgdata = Path(pgdata).absolute()
        version_file = pgdata / "PG_VERSION"
        if not version_file.is_file():
            raise PostgresError(f"{pgdata} is not a PostgreSQL data directory (no PG_VERSION)")
        if bindir is None:
            # Match the binaries to the data directory, not to the newest install.
            major = version_file.read_text().strip().split(".")[0]
            bindir = find_bindir(int(major) if major.isdigit() else None)
        instance = cls(
            pgdata=pgdata,
            port=port if port is not None else free_port(),
            bindir=bindir,
            log_path=cls.default_log_path(pgdata),
        )
        # Loopback and no sockets are invariants of every instance; a restored config may say otherwise.
        set_auto_conf(pgdata, _base_settings(instance.port))
        chown_to_db_user(pgdata)
        pgdata.chmod(0o700)  # postgres refuses to start on a group/world-accessible data directory
        _check_db_user_can_write(pgdata)
        return instance

    # -- process control ----------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> list[str]:
        return as_db_user([str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), *args])

    def _prepare_log(self) -> None:
        # pg_ctl opens the log as the db user, which may not be able to create files in the parent dir.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch(exist_ok=True)
        chown_to_db_user(self.log_path)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the server log ('' if there is none)."""
        try:
            with self.log_path.open(errors="replace") as handle:
                return "".join(deque(handle, maxlen=lines)).rstrip()
        except OSError:
            return ""

    def _error(self, message: str) -> PostgresError:
        tail = self.log_tail()
        detail = f"{message}\n--- last lines of {self.log_path} ---\n{tail}" if tail else message
        return PostgresError(detail, hint=f"see the server log {self.log_path}")

    def start(self, *, wait: bool = True, timeout: float = 60) -> None:
        """Start the server.

        With wait=True this returns once the server accepts connections (a hot standby or a server still
        in archive recovery counts; see wait_promoted). A server that shuts down at its recovery target
        makes pg_ctl -w fail; use wait=False and then wait_stopped() for that case.
        """
        self._prepare_log()
        if wait:
            args = ["start", "-w", "-t", str(max(1, math.ceil(timeout))), "-l", str(self.log_path)]
        else:
            args = ["start", "-W", "-l", str(self.log_path)]
        try:
            _run(self._pg_ctl(*args), what=f"pg_ctl start {self.pgdata}", timeout=timeout + 30)
        except PostgresError as exc:
            raise self._error(exc.message) from exc
        if not wait:
            # Close the window before the postmaster writes its pid file, so a following
            # is_running()/wait_stopped() does not mistake "not yet started" for "already stopped".
            deadline = time.monotonic() + min(timeout, 10)
            while not (self.pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (modes: smart, fast, immediate); no error if it is not running."""
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {_STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        try:
            _run(
                self._pg_ctl("stop", "-m", mode, "-w", "-t", str(max(1, math.ceil(timeout)))),
                what=f"pg_ctl stop {self.pgdata}",
                timeout=timeout + 30,
            )
        except PostgresError as exc:
            # It may have exited on its own between the status check and the stop.
            if self.is_running():
                raise self._error(exc.message) from exc

    def is_running(self) -> bool:
        """Whether a postmaster is running on this data directory (pg_ctl status)."""
        if not self.pgdata.is_dir():
            return False
        result = subprocess.run(
            self._pg_ctl("status"), capture_output=True, text=True, cwd="/", timeout=60, check=False
        )
        # pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
        if result.returncode in (0, 3, 4):
            return result.returncode == 0
        raise PostgresError(f"pg_ctl status {self.pgdata} failed: {result.stderr.strip()}")

    def promote(self, *, wait: bool = True, timeout: float = 60) -> None:
        """Promote a standby or a paused recovery (pg_ctl promote)."""
        args = ["promote", "-w", "-t", str(max(1, math.ceil(timeout)))] if wait else ["promote", "-W"]
        try:
            _run(self._pg_ctl(*args), what=f"pg_ctl promote {self.pgdata}", timeout=timeout + 30)
        except PostgresError as exc:
            raise self._error(exc.message) from exc

    # -- SQL ------------------------------------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq connection string for this instance over loopback TCP."""
        return make_conninfo(host=LISTEN_ADDRESS, port=str(self.port), user=DB_SUPERUSER, dbname=dbname)

    def connect(self, dbname: str = "postgres", *, connect_timeout: int = 10) -> psycopg.Connection[Any]:
        """An autocommit psycopg connection; the caller closes it."""
        try:
            return psycopg.connect(self.conninfo(dbname), autocommit=True, connect_timeout=connect_timeout)
        except psycopg.Error as exc:
            raise PostgresError(f"cannot connect to 127.0.0.1:{self.port}/{dbname}: {exc}") from exc

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL like `psql -At -c`: the last result's rows, columns '|'-separated, rows '\\n'-joined."""
        with self.connect(dbname) as conn:
            try:
                cur = conn.execute(sql)
                while cur.nextset():  # several statements: psql -c prints only the last result
                    pass
            except psycopg.Error as exc:
                raise PostgresError(f"SQL failed on port {self.port}: {exc}") from exc
            result = cur.pgresult
            if result is None or not cur.description:
                return ""
            encoding = conn.info.encoding
            # Raw text values, so booleans read 't'/'f' and NULL reads '' exactly as psql -At shows them.
            return "\n".join(
                "|".join(
                    "" if (value := result.get_value(row, col)) is None else bytes(value).decode(encoding)
                    for col in range(result.nfields)
                )
                for row in range(result.ntuples)
            )

    def query(
        self, sql: str, params: tuple[Any, ...] = (), dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement with parameters; the rows as Python values ([] for no result set)."""
        with self.connect(dbname) as conn:
            try:
                cur = conn.execute(sql, params or None)
                return list(cur.fetchall()) if cur.description else []
            except psycopg.Error as exc:
                raise PostgresError(f"SQL failed on port {self.port}: {exc}") from exc

    # -- waiting --------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the server accepts connections (recovery done, or consistent as a hot standby)."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last_error = str(exc).strip()
            if not self.is_running():
                raise self._error(f"server on {self.pgdata} is not running: {last_error}")
            if time.monotonic() >= deadline:
                raise self._error(f"server on port {self.port} not ready after {timeout:.0f}s: {last_error}")
            time.sleep(0.2)

    def wait_promoted(self, timeout: float = 120) -> None:
        """Wait until pg_is_in_recovery() is false (archive recovery finished and promoted)."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            try:
                with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute(
                        "SELECT pg_is_in_recovery(), "
                        "CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END"
                    ).fetchone()
                if row is not None and not row[0]:
                    return
                state = f"in recovery, replay pause state {row[1] if row else 'unknown'}"
            except psycopg.Error as exc:
                state = str(exc).strip()
            if not self.is_running():
                raise self._error(f"server on {self.pgdata} stopped before promotion ({state})")
            if time.monotonic() >= deadline:
                raise self._error(f"server on port {self.port} not promoted after {timeout:.0f}s ({state})")
            time.sleep(0.2)

    def wait_stopped(self, timeout: float = 120) -> None:
        """Wait until the server exits by itself (recovery_target_action=shutdown after start(wait=False))."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() >= deadline:
                raise self._error(f"server on {self.pgdata} still running after {timeout:.0f}s")
            time.sleep(0.2)

    # -- teardown -------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop immediately if running, then remove the data directory and the log."""
        if self.is_running():
            self.stop("immediate")
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
