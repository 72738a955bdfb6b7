"""The one fixture module: real PostgreSQL clusters (initdb'd on free ports) and the pgvault CLI.

Everything runs as a user would run it: the `pgvault` console script in a subprocess, as the
database OS user when the tests run as root (PostgreSQL runs archive_command as that user too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from repos import S3_ENV, FileRepo, MotoServer, RepoHandle, S3Repo

from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user

# The console script of the pgvault under test, by its real path (the postgres user may not be able
# to enter the checkout, but can reach the venv).
PGVAULT = str(Path(sys.executable).parent.resolve() / "pgvault")
os.environ.update(S3_ENV)
BACKENDS = ("file", "s3")
_moto: MotoServer | None = None


def moto() -> MotoServer:
    """The session's moto_server, started on first use."""
    global _moto
    if _moto is None:
        _moto = MotoServer()
    return _moto


@pytest.fixture(scope="session", autouse=True)
def _stop_moto() -> Iterator[None]:
    yield
    if _moto is not None:
        _moto.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that asks for `backend` (the `cluster` fixture does) runs on each backend, unless
    # marked file_only (it looks at what only a directory has: inodes, permissions, temp files) or
    # s3_only (what only object storage has).
    if "backend" in metafunc.fixturenames:
        only = [b for b in BACKENDS if metafunc.definition.get_closest_marker(f"{b}_only")]
        metafunc.parametrize("backend", only or list(BACKENDS), indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "file"))


def new_repo(workdir: Path, backend: str, name: str = "repo", **settings: Any) -> RepoHandle:
    """A fresh, empty repository: a directory in workdir, or a fresh bucket."""
    if backend == "s3":
        return S3Repo(moto(), prefix=name, **settings)
    return FileRepo(workdir / name)


def make_workdir(prefix: str = "pgvault-test-") -> Path:
    """A temp dir the database user owns (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    chown_to_db_user(path)
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout + self.stderr


def run_pgvault(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 300) -> Result:
    cmd = [PGVAULT]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    proc = subprocess.run(as_db_user(cmd), capture_output=True, text=True, cwd="/tmp", timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Mark:
    """One committed batch: its rows, and positions just after its commit."""

    batch: int
    rows: list[tuple[int, int]]
    committed_at: datetime  # client clock, just after COMMIT returned
    lsn_after: str  # pg_current_wal_lsn() just after the commit
    xid: int
    between_next: datetime  # a moment after this commit and before the next batch's


@dataclass
class Marks:
    items: list[Mark] = field(default_factory=list)

    def __getitem__(self, index: int) -> Mark:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def rows_through(self, index: int, base: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        rows = list(base or [])
        for mark in self.items[: index + 1]:
            rows.extend(mark.rows)
        return sorted(rows)


@dataclass
class Cluster:
    """A running PostgreSQL archiving into a repository through pgvault."""

    workdir: Path
    pg: LocalInstance
    config: Path
    repo: RepoHandle
    restored: list[LocalInstance] = field(default_factory=list)
    _batch: int = 0
    _restores: int = 0

    # pgvault ------------------------------------------------------------------------------
    def pgvault(self, *args: str, **kwargs: Any) -> Result:
        return run_pgvault(*args, config=self.config, **kwargs)

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self.pgvault(*args, **kwargs)
        assert result.returncode == 0, f"pgvault {' '.join(args)} failed ({result.returncode}):\n{result.out}"
        return result

    def backup(self, *args: str) -> str:
        return self.ok("-q", "backup", *args).stdout.strip()

    def flush_archive(self) -> None:
        """Switch WAL and wait until that segment is in the repository (pgvault check does exactly that)."""
        self.ok("-q", "check")

    def stop_all(self) -> None:
        """Stop the cluster and every copy restored from it (fixture teardown)."""
        for instance in [*self.restored, self.pg]:
            with contextlib.suppress(Exception):
                instance.stop(mode="immediate")

    def db_user_dir(self, name: str) -> Path:
        """A new empty directory in the workdir that the database user owns."""
        path = self.workdir / name
        path.mkdir()
        chown_to_db_user(path)
        return path

    # SQL ----------------------------------------------------------------------------------
    def sql(self, sql: str) -> str:
        return self.pg.psql(sql)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.pg.query(sql, params)

    def create_table(self, name: str = "t") -> None:
        self.sql(f"CREATE TABLE IF NOT EXISTS {name} (batch int NOT NULL, n int NOT NULL)")

    def commit_batch(self, rows: int = 5, table: str = "t") -> Mark:
        self._batch += 1
        batch = self._batch
        with self.pg.connect() as conn:
            with conn.transaction():
                xid = int(conn.execute("SELECT txid_current()").fetchone()[0])
                conn.execute(f"INSERT INTO {table} SELECT %s, g FROM generate_series(1, %s) g", (batch, rows))
            committed_at = datetime.now(UTC)
            lsn_after = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])
        return Mark(batch, [(batch, n) for n in range(1, rows + 1)], committed_at, lsn_after, xid,
                    committed_at)

    def commit_batches(self, count: int, *, pause: float = 0.4, rows: int = 5, table: str = "t") -> Marks:
        """Commit `count` batches `pause` seconds apart; between_next lies halfway in each pause."""
        marks = Marks()
        for i in range(count):
            if i:
                time.sleep(pause)
            marks.items.append(self.commit_batch(rows, table))
        for mark in marks.items:
            mark.between_next = mark.committed_at + timedelta(seconds=pause / 2)
        time.sleep(pause / 2 + 0.05)
        return marks

    # restore ------------------------------------------------------------------------------
    def restore(self, *flags: str, pgdata: Path | None = None) -> Result:
        target = pgdata or self.next_restore_dir()
        return self.pgvault("-q", "restore", "--pgdata", str(target), *flags)

    def next_restore_dir(self) -> Path:
        self._restores += 1
        return self.workdir / f"restore{self._restores}"

    def restore_into(self, *flags: str, archive_mode: str = "off", start: bool = True,
                     wait_promoted: bool = True) -> LocalInstance:
        """Restore, start the copy on a free port, and wait until it reached its target and promoted."""
        return self.restore_json(*flags, archive_mode=archive_mode, start=start, wait_promoted=wait_promoted)[1]

    def restore_json(self, *flags: str, archive_mode: str = "off", pgdata: Path | None = None,
                     start: bool = True, wait_promoted: bool = True) -> tuple[dict[str, Any], LocalInstance]:
        """Like restore_into, but with `restore --json`: also returns what pgvault says it restored."""
        import json

        pgdata = pgdata or self.next_restore_dir()
        result = self.pgvault("-q", "restore", "--json", "--pgdata", str(pgdata), "--archive-mode", archive_mode,
                              *flags)
        assert result.returncode == 0, f"restore failed ({result.returncode}):\n{result.out}"
        instance = LocalInstance.existing(pgdata)
        self.restored.append(instance)
        if start:
            instance.start()
            if wait_promoted:
                instance.wait_promoted()
        return json.loads(result.stdout), instance


def start_standby(cluster: Cluster, name: str = "standby") -> LocalInstance:
    """A streaming standby of cluster.pg (pg_basebackup -R), started and streaming.

    It keeps the primary's settings, archive_mode=on included, which archives nothing on a standby
    (as on a Patroni replica). Registered with cluster.restored, so stop_all stops it too.
    """
    pgdata = cluster.workdir / name
    made = subprocess.run(as_db_user([str(cluster.pg.bindir / "pg_basebackup"), "--dbname", cluster.pg.conninfo(),
                                      "--pgdata", str(pgdata), "--write-recovery-conf", "--wal-method=stream",
                                      "--checkpoint=fast", "--no-sync", "--no-manifest"]),
                          capture_output=True, text=True, cwd="/tmp", timeout=300, check=False)
    assert made.returncode == 0, f"pg_basebackup failed:\n{made.stdout}{made.stderr}"
    standby = LocalInstance.existing(pgdata)
    cluster.restored.append(standby)
    standby.start()
    wait_for(lambda: standby.query("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
             f"standby {name} to stream from the primary")
    return standby


def rows_of(instance: LocalInstance, table: str = "t") -> list[tuple[int, int]]:
    return sorted((int(b), int(n)) for b, n in instance.query(f"SELECT batch, n FROM {table}"))


def write_policy(path: Path, cluster: str, conninfo: str, repo: RepoHandle, **sections: Any) -> None:
    data: dict[str, Any] = {"cluster": cluster, "postgres": {"conninfo": conninfo}, "repository": repo.section()}
    data.update(sections)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    chown_to_db_user(path)


def new_cluster(workdir: Path, *, name: str = "pg", cluster: str = "test", repo: RepoHandle | None = None,
                backend: str = "file", init: bool = True, settings: dict[str, str] | None = None,
                initdb_options: list[str] | None = None, **sections: Any) -> Cluster:
    repo = repo or new_repo(workdir, backend)
    config = workdir / f"{name}.yaml"
    pg = LocalInstance.create(workdir / name, initdb_options=initdb_options)
    archive_command = f"{PGVAULT} --config {config} wal-push %p"
    set_auto_conf(pg.pgdata, {"wal_level": "replica", "archive_mode": "on", "archive_command": archive_command,
                              **(settings or {})})
    sections.setdefault("backup", {"part_size": "1MiB"})
    write_policy(config, cluster, pg.conninfo(), repo, **sections)
    pg.start()
    made = Cluster(workdir=workdir, pg=pg, config=config, repo=repo)
    if init:
        made.ok("init")
    return made


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(workdir: Path, backend: str) -> Iterator[Cluster]:
    """A fresh cluster archiving into a fresh repository (of each backend), initialized, with table t."""
    made = new_cluster(workdir, backend=backend)
    made.create_table()
    try:
        yield made
    finally:
        made.stop_all()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.01) -> Any:
    """Poll condition until it is truthy (returned) or timeout seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def archiving_blocked(cluster: Cluster) -> Iterator[None]:
    """archive_command = 'false': a backup then streams everything and waits (bounded) for its WAL."""
    original = cluster.sql("SHOW archive_command")
    cluster.sql("ALTER SYSTEM SET archive_command = 'false'")
    cluster.sql("SELECT pg_reload_conf()")
    wait_for(lambda: cluster.sql("SHOW archive_command") == "false", "archive_command = false")
    try:
        yield
    finally:
        quoted = "'" + original.replace("'", "''") + "'"
        cluster.sql(f"ALTER SYSTEM SET archive_command = {quoted}")
        cluster.sql("SELECT pg_reload_conf()")
        wait_for(lambda: cluster.sql("SHOW archive_command") == original, "archive_command restored")


def processes_in(path: Path) -> list[str]:
    """Processes whose command line names path or whose working directory is inside it, as
    "<pid>: <command line> (cwd <dir>)".

    A postmaster names its data directory on its command line; its children run with it as their
    working directory.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(path) in cmdline or cwd.startswith(str(path)):
            found.append(f"{proc.name}: {cmdline.strip()} (cwd {cwd})")
    return found


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process group started with start_new_session, and reap its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
