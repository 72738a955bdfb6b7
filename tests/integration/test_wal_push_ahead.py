"""wal-push look-ahead against real PostgreSQL 15, on both backends where the repository matters.

How a call's path is observed: archive_command (or the test) runs pgvault with PYTHONPROFILEIMPORTTIME=1,
so each process writes the modules it imported to stderr. A call that imported pgvault.cli took the full
path (click, the policy, the repository); one that did not was answered by the fast path from a marker.
That is the process's own account of what it ran, not a log line pgvault could print wrongly.

The spool lives in each test's work directory (PGVAULT_SPOOL_DIR), for the test's calls and
PostgreSQL's alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import (
    PGVAULT,
    Cluster,
    Result,
    archiving_blocked,
    moto,
    new_cluster,
    rows_of,
    wait_for,
)
from faultproxy import FaultProxy
from repos import FileRepo, RepoHandle, S3Repo

from pgvault import archive
from pgvault.config import load_policy
from pgvault.pg.instance import as_db_user, chown_to_db_user
from pgvault.push_ahead import BUSY_PREFIX, PUSHER_LOCK, is_segment_name
from pgvault.repo import open_storage
from pgvault.repo.layout import Layout
from pgvault.spool import lock_holder, push_spool

pytestmark = [pytest.mark.integration]

LAYOUT = Layout("test")  # new_cluster's default cluster name
_FULL_PATH = re.compile(r"\|\s+pgvault\.cli$", re.M)
_PUSHED = re.compile(r"^debug: look-ahead: pushed (\w{24})$")
_NOT_PUSHED = re.compile(r"^debug: look-ahead: (\w{24}) not pushed")


def full_path(stderr: str) -> bool:
    """Whether a pgvault run under PYTHONPROFILEIMPORTTIME imported the CLI (the full path)."""
    return bool(_FULL_PATH.search(stderr))


def said(stderr: str) -> str:
    """What pgvault itself wrote to stderr (the import trace left out)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


@dataclass
class Pushing:
    """A cluster whose archive_command records, per call, what the pgvault process imported."""

    cluster: Cluster
    spool_root: Path
    trace: Path

    @property
    def spool(self) -> Path:
        return push_spool(self.cluster.config)  # PGVAULT_SPOOL_DIR is set for the test process too

    def markers(self) -> set[str]:
        return {p.name for p in self.spool.iterdir() if is_segment_name(p.name)} if self.spool.is_dir() else set()

    def calls(self) -> list[tuple[str, bool]]:
        """(segment, took the full path) for every archive_command run so far."""
        return [(p.name.rsplit(".", 1)[0], full_path(p.read_text())) for p in sorted(self.trace.iterdir())]

    def failed_calls(self) -> list[str]:
        """The archive_command runs that exited non-zero, with what they said."""
        return [f"{p.name}: {said(p.read_text())}" for p in sorted(self.trace.iterdir())
                if re.search(r"^exit \d+$", p.read_text(), re.M)]

    def push(self, path: str, *flags: str, cwd: Path | None = None) -> Result:
        """`pgvault wal-push path` as PostgreSQL runs it (as its user, in the data directory by default),
        with the import trace on stderr."""
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
        proc = subprocess.run(as_db_user([PGVAULT, "--config", str(self.cluster.config), *flags, "wal-push", path]),
                              capture_output=True, text=True, cwd=cwd or self.cluster.pg.pgdata, env=env,
                              timeout=300, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)


def traced_archive_command(config: Path, spool_root: Path, trace: Path) -> str:
    # A failing call appends its exit status to its trace (and still exits with it).
    return (f"PGVAULT_SPOOL_DIR={spool_root} PYTHONPROFILEIMPORTTIME=1 {PGVAULT} --config {config} "
            f"wal-push %p 2>{trace}/%f.$$ || {{ rc=$?; echo exit $rc >>{trace}/%f.$$; exit $rc; }}")


def pushing_cluster(workdir: Path, backend: str, monkeypatch: pytest.MonkeyPatch, *,
                    settings: dict[str, str] | None = None, spool_root: Path | None = None,
                    **kwargs: object) -> Pushing:
    spool_root = spool_root or workdir / "spool"
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(spool_root))
    trace = workdir / "trace"
    trace.mkdir()
    chown_to_db_user(trace)
    config = workdir / "pg.yaml"  # new_cluster's name for it
    command = traced_archive_command(config, spool_root, trace)
    cluster = new_cluster(workdir, backend=backend, settings={"archive_command": command, "autovacuum": "off",
                                                              **(settings or {})}, **kwargs)  # type: ignore[arg-type]
    cluster.create_table()
    return Pushing(cluster, spool_root, trace)


@pytest.fixture
def pushing(workdir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pushing]:
    made = pushing_cluster(workdir, backend, monkeypatch)
    try:
        yield made
    finally:
        made.cluster.stop_all()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ready_names(cluster: Cluster) -> set[str]:
    status = cluster.pg.pgdata / "pg_wal" / "archive_status"
    return {p.name.removesuffix(".ready") for p in status.iterdir() if p.name.endswith(".ready")}


def status_snapshot(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """archive_status as it stands: name -> (inode, mtime), so a rename or rewrite shows."""
    status = cluster.pg.pgdata / "pg_wal" / "archive_status"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in status.iterdir()}


def queue_segments(cluster: Cluster, count: int) -> list[str]:
    """With archiving blocked: write and switch `count` times; the segments PostgreSQL marks .ready."""
    names = []
    for _ in range(count):
        cluster.commit_batch(3)
        names.append(cluster.sql("SELECT pg_walfile_name(pg_switch_wal())"))
    wait_for(lambda: set(names) <= ready_names(cluster), "the switched segments to be .ready")
    return names


def copy_queue(cluster: Cluster, names: list[str], directory: Path) -> Path:
    """A pg_wal elsewhere holding copies of names, each .ready: what a second node's would look like."""
    pg_wal = directory / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    for name in names:
        (pg_wal / name).write_bytes((cluster.pg.pgdata / "pg_wal" / name).read_bytes())
        (pg_wal / "archive_status" / f"{name}.ready").write_text("")
    for path in [directory, pg_wal, *pg_wal.rglob("*")]:
        chown_to_db_user(path)
    return pg_wal


def stored_raw(cluster: Cluster, name: str) -> bytes:
    """A WAL file's content as the repository holds it (decompressed by the test, not by pgvault)."""
    stored = cluster.repo.read(LAYOUT.wal_key(name))
    return stored if name.endswith(".history") else zstandard.ZstdDecompressor().decompress(stored)


def remove_object(repo: RepoHandle, key: str) -> None:
    """Delete a stored object whole: on a directory, its metadata sidecar too (FileStorage.head answers
    from the sidecar alone)."""
    repo.remove(key)
    if isinstance(repo, FileRepo):
        (repo.path / f"{key}.meta").unlink(missing_ok=True)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- (a) under load: every archived segment byte-exact, most calls on the fast path -------------------

def switch_bursts(cluster: Cluster, stop: threading.Event) -> None:
    """Until stop: every 2 s, four segments completed at once (a write and a WAL switch, four times)."""
    with cluster.pg.connect() as conn:
        conn.autocommit = True
        conn.execute("CREATE TABLE IF NOT EXISTS burst (n int)")
        while not stop.wait(2):
            conn.execute("DO $$ BEGIN FOR i IN 1..4 LOOP INSERT INTO burst VALUES (i); PERFORM pg_switch_wal(); "
                         "END LOOP; END $$")


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_under_pgbench_every_archived_segment_is_in_the_repository_byte_exact_and_most_calls_are_fast(
        workdir: Path, backend: str, background: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # 1 MiB segments: pgbench fills several per second, and every 2 s four WAL switches in a row add a
    # burst, so segments queue up behind archive_command as they do on a busy server with 16 MiB ones
    # (whatever this machine's speed). wal_keep_size keeps every segment in pg_wal for the byte comparison.
    # background: the look-ahead runs in the detached pusher (archive.background) instead of in the calls.
    made = pushing_cluster(workdir, backend, monkeypatch, initdb_options=["--wal-segsize=1"],
                           settings={"wal_keep_size": "4GB", "max_wal_size": "4GB", "checkpoint_timeout": "1h",
                                     "synchronous_commit": "off"},
                           archive={"background": background})
    cluster, pg = made.cluster, made.cluster.pg
    try:
        bench = [str(pg.bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
        subprocess.run([*bench, "-i", "-s", "2", "-q", "postgres"], check=True, capture_output=True)
        backup = cluster.backup()
        load = subprocess.Popen([*bench, "-c", "2", "-T", "20", "postgres"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        stop = threading.Event()
        bursts = threading.Thread(target=switch_bursts, args=(cluster, stop), daemon=True)
        bursts.start()
        try:
            marks = cluster.commit_batches(6, pause=3)
        finally:
            _out, err = load.communicate(timeout=120)
            stop.set()
            bursts.join(30)
        assert load.returncode == 0, err
        cluster.commit_batch()
        cluster.flush_archive()
        wait_for(lambda: not ready_names(cluster), "PostgreSQL to archive everything", timeout=300)

        archived, failed = (int(v) for v in pg.query("SELECT archived_count, failed_count FROM pg_stat_archiver")[0])
        calls = made.calls()
        full = [name for name, was_full in calls if was_full]
        fast = [name for name, was_full in calls if not was_full]
        print(f"{backend}: {archived} files archived, {len(full)} full-path calls, {len(fast)} fast-path calls")
        print("full:", full)
        if background:
            print((made.spool / "pusher.log").read_text())
        assert failed == 0 and len(calls) == archived, (failed, len(calls), archived)
        assert archived > 50, f"the load made only {archived} segments"  # (the bursts alone make 36)
        # Without the look-ahead every call is a full one; with it, each full call's look-ahead takes
        # what queued up meanwhile (here 1-5 segments, depending on the machine's speed). The pusher
        # keeps ahead of the calls while it runs: a full path only when it had to start again.
        pusher_log = made.spool / "pusher.log"
        if background:
            assert len(full) < archived / 4, f"{len(full)} of {archived} calls took the full path"
            assert "pusher started for" in pusher_log.read_text()
        else:
            assert len(full) < archived * 2 / 3, f"{len(full)} of {archived} calls took the full path"
            assert not pusher_log.exists()
        assert made.markers() == set()  # every marker was used by PostgreSQL's call for its segment

        # Every file PostgreSQL was told is archived, fetched back through pgvault's verified read,
        # is byte-identical to the one still in pg_wal.
        policy = load_policy(cluster.config)
        storage = open_storage(policy.repository)
        status = pg.pgdata / "pg_wal" / "archive_status"
        done = sorted(p.name.removesuffix(".done") for p in status.iterdir() if p.name.endswith(".done"))
        assert set(fast) <= set(done)
        compared = 0
        for name in done:
            assert storage.head(LAYOUT.wal_key(name)) is not None, f"{name} was reported archived but is not stored"
            original = pg.pgdata / "pg_wal" / name
            if original.exists():
                archive.fetch(storage, LAYOUT, name, tmp_path / name)
                assert sha256((tmp_path / name).read_bytes()) == sha256(original.read_bytes()), name
                compared += 1
        assert compared >= len(fast) > 0
        # And through the CLI, as restore_command runs it, for a few the fast path answered for.
        fetched = cluster.db_user_dir("fetched")
        for name in fast[:: max(1, len(fast) // 3)]:
            cluster.ok("wal-fetch", name, str(fetched / name))
            assert (fetched / name).read_bytes() == (pg.pgdata / "pg_wal" / name).read_bytes()

        # The central shape: restored to a moment inside the load, exactly the rows committed before it.
        restored, instance = cluster.restore_json("--target-time", marks[2].between_next.isoformat())
        assert restored["backup_id"] == backup
        assert rows_of(instance) == marks.rows_through(2)

        if background:  # the pusher goes when PostgreSQL stops, leaving no busy file behind
            pg.stop()
            wait_for(lambda: lock_holder(made.spool / PUSHER_LOCK) is None, "the pusher to exit", timeout=15)
            assert "pusher stopped: PostgreSQL stopped" in pusher_log.read_text()
            assert not [p for p in made.spool.iterdir() if p.name.startswith(BUSY_PREFIX)]
    finally:
        cluster.stop_all()


# ---- (b) a marker that does not match: the full path decides ----------------------------------------

def test_a_marker_not_matching_the_file_is_not_trusted_and_the_full_path_decides(pushing: Pushing) -> None:
    cluster = pushing.cluster
    with archiving_blocked(cluster):
        names = queue_segments(cluster, 5)
        # Copies, so the live pg_wal is never tampered with.
        copy = copy_queue(cluster, names, cluster.workdir / "copy")
        check_tampering(pushing, names, copy)
    # PostgreSQL archives its own (untampered) files: the markers were for the copy's directory, so
    # none of them answers for these; every segment ends up stored byte-identical.
    cluster.flush_archive()
    wait_for(lambda: not set(names) & ready_names(cluster), "PostgreSQL to archive the queued segments")
    assert pushing.failed_calls() == []
    for name in names:
        assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()


def check_tampering(pushing: Pushing, names: list[str], copy: Path) -> None:
    cluster = pushing.cluster
    first = pushing.push(str(copy / names[0]), "--debug")
    assert first.returncode == 0, first.out
    assert full_path(first.stderr)
    assert pushing.markers() >= set(names[1:]), first.stderr
    for name in names[1:]:
        assert f"look-ahead: pushed {name}" in first.stderr
        assert stored_raw(cluster, name) == (copy / name).read_bytes()

    # The marker says another file with other content was pushed: full path, which finds the segment
    # archived. (With the file's own identity the marker stands for that very file, unchanged since it
    # was pushed; tests/unit/test_push_ahead.py covers that the identity alone then answers.)
    marker = pushing.spool / names[1]
    fields = json.loads(marker.read_bytes())
    assert fields["identity"][1] == (copy / names[1]).stat().st_ino  # the look-ahead noted the file's identity
    with open(marker, "r+b") as handle:  # in place: still the database user's, still 0600
        handle.write(json.dumps({**fields, "raw_sha256": sha256(b"other"),
                                 "identity": [v + 1 for v in fields["identity"]]}).encode())
        handle.truncate()
    result = pushing.push(str(copy / names[1]))
    assert result.returncode == 0 and full_path(result.stderr), result.out
    assert not marker.exists()

    # The file differs from what was pushed: the fast path does not answer, the full path refuses
    # to overwrite the archived segment, and the repository is unchanged.
    key = LAYOUT.wal_key(names[2])
    before = cluster.repo.state(key)
    flip_middle(copy / names[2])
    result = pushing.push(str(copy / names[2]))
    assert result.returncode == 1 and full_path(result.stderr), result.out
    assert "already archived with different content" in result.stderr
    assert cluster.repo.state(key) == before
    assert not (pushing.spool / names[2]).exists()

    # A marker matching the tampered file, but not written by the database user: not trusted either.
    flip_middle(copy / names[3])
    data = (copy / names[3]).read_bytes()
    forged = pushing.spool / names[3]
    fields = json.loads(forged.read_bytes())
    forged.unlink()
    forged.write_bytes(json.dumps({**fields, "raw_sha256": sha256(data)}).encode())
    forged.chmod(0o600)
    assert forged.stat().st_uid != (pushing.spool / names[4]).stat().st_uid  # the test's user, not PostgreSQL's
    result = pushing.push(str(copy / names[3]))
    assert result.returncode == 1 and full_path(result.stderr), result.out
    assert stored_raw(cluster, names[3]) != data

    # The untouched one: answered by the fast path, marker used up.
    result = pushing.push(str(copy / names[4]))
    assert result.returncode == 0 and not full_path(result.stderr), result.out
    assert not (pushing.spool / names[4]).exists()


# ---- (c) a failing look-ahead push: the call still succeeds, no marker ------------------------------

def test_a_failing_look_ahead_push_leaves_no_marker_and_does_not_fail_the_call(pushing: Pushing) -> None:
    cluster = pushing.cluster
    with archiving_blocked(cluster):
        names = queue_segments(cluster, 4)
        # Another writer already stored different content under the third name (the repository
        # refuses to overwrite it): that look-ahead push fails.
        other = cluster.workdir / "other"
        other.mkdir()
        chown_to_db_user(other)
        (other / names[2]).write_bytes((cluster.pg.pgdata / "pg_wal" / names[2]).read_bytes())
        chown_to_db_user(other / names[2])
        flip_middle(other / names[2])
        assert pushing.push(str(other / names[2])).returncode == 0
        conflicting = cluster.repo.state(LAYOUT.wal_key(names[2]))

        result = pushing.push(f"pg_wal/{names[0]}", "--debug")
        assert result.returncode == 0, result.out
        assert stored_raw(cluster, names[0]) == (cluster.pg.pgdata / "pg_wal" / names[0]).read_bytes()
        assert re.search(rf"look-ahead: {names[2]} not pushed: .*already archived with different content",
                         result.stderr), result.stderr
        assert names[2] not in pushing.markers()
        assert cluster.repo.state(LAYOUT.wal_key(names[2])) == conflicting
        for name in pushing.markers():  # whatever was marked is in the repository, byte-exact
            assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()
        # Without --debug the call says nothing about it.
        remove_object(cluster.repo, LAYOUT.wal_key(names[0]))
        quiet = pushing.push(f"pg_wal/{names[0]}")
        assert quiet.returncode == 0 and said(quiet.stderr) == "", quiet.stderr

        # PostgreSQL's own call for that segment takes the full path and fails, as it must.
        blocked = pushing.push(f"pg_wal/{names[2]}")
        assert blocked.returncode == 1 and full_path(blocked.stderr)
        remove_object(cluster.repo, LAYOUT.wal_key(names[2]))  # the operator removes the foreign object
    cluster.flush_archive()
    assert pushing.failed_calls() == []
    for name in names:
        assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()


def flaky_repo(proxy: FaultProxy) -> S3Repo:
    """A repository behind the fault proxy, with short timeouts and one retry, so faults surface fast."""
    return S3Repo(moto(), endpoint=proxy.url, connect_timeout="1s", read_timeout="3s", retries=1,
                  retry_window="5s")


@pytest.mark.s3_only
def test_s3_faults_in_look_ahead_pushes_leave_no_marker_and_never_fail_the_call(
        workdir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(moto().port, seed=6) as proxy:
        repo = flaky_repo(proxy)
        made = pushing_cluster(workdir, backend, monkeypatch, repo=repo)
        cluster = made.cluster
        try:
            with archiving_blocked(cluster):
                names = queue_segments(cluster, 6)
                copy = copy_queue(cluster, names, workdir / "copy")
                proxy.set_faults(0.3, ("500", "reset"))
                seen = False
                for _ in range(20):
                    for marker in made.spool.glob("0*"):
                        marker.unlink()  # each round looks ahead at the same five again
                    result = made.push(str(copy / names[0]), "--debug")
                    lines = result.stderr.splitlines()
                    failed = {m.group(1) for m in map(_NOT_PUSHED.match, lines) if m}
                    pushed = {m.group(1) for m in map(_PUSHED.match, lines) if m}
                    assert pushed == made.markers() and not failed & made.markers(), result.stderr
                    for name in pushed:  # a marker only for what is stored, byte-exact
                        assert stored_raw(cluster, name) == (copy / name).read_bytes()
                    if result.returncode == 0:
                        assert stored_raw(cluster, names[0]) == (copy / names[0]).read_bytes()
                        seen = seen or bool(failed)
                    else:
                        assert "look-ahead" not in result.stderr  # the call's own push failed: no look-ahead
                    if seen:
                        break
                proxy.set_faults(0.0)
                assert seen, "no round had the call succeed while a look-ahead push failed"
            cluster.flush_archive()
        finally:
            cluster.stop_all()


# ---- (d) a spool that cannot be used: archiving goes on ---------------------------------------------

@pytest.mark.parametrize("spool", ["root-owned", "a-file"])
def test_archiving_works_when_the_spool_cannot_be_written(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                           spool: str) -> None:
    spool_root = workdir / "spool"
    if spool == "root-owned":
        spool_root.mkdir(mode=0o755)  # the database user cannot create push/ in it
    else:
        spool_root.write_text("")
    made = pushing_cluster(workdir, "file", monkeypatch, spool_root=spool_root)
    cluster = made.cluster
    try:
        with archiving_blocked(cluster):
            names = queue_segments(cluster, 4)
            result = made.push(f"pg_wal/{names[0]}", "--debug")
            assert result.returncode == 0, result.out
            assert "cannot be created or written" in result.stderr and "look-ahead: pushed" not in result.stderr
        cluster.flush_archive()
        assert made.failed_calls() == []  # (archive_command 'false' of the blocked time is not traced)
        for name in names:
            assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()
        assert all(was_full for _name, was_full in made.calls())
        assert not (spool_root / "push").exists()
    finally:
        cluster.stop_all()


# ---- (e) .ready files are PostgreSQL's -----------------------------------------------------------------

def test_ready_files_are_never_renamed_by_pgvault_postgres_renames_them(pushing: Pushing) -> None:
    cluster = pushing.cluster
    with archiving_blocked(cluster):
        names = queue_segments(cluster, 5)
        before = status_snapshot(cluster)
        # The full path for the first (as PostgreSQL calls it: relative to the data directory)...
        result = pushing.push(f"pg_wal/{names[0]}")
        assert result.returncode == 0 and full_path(result.stderr), result.out
        assert pushing.markers() == set(names[1:])
        assert status_snapshot(cluster) == before
        # ...and the fast path for the second: both leave archive_status exactly as it was.
        result = pushing.push(f"pg_wal/{names[1]}")
        assert result.returncode == 0 and not full_path(result.stderr), result.out
        assert pushing.markers() == set(names[2:])
        assert status_snapshot(cluster) == before
        assert all(f"{name}.ready" in before for name in names)
    cluster.flush_archive()
    wait_for(lambda: not set(names) & ready_names(cluster), "PostgreSQL to rename the .ready files")
    status = cluster.pg.pgdata / "pg_wal" / "archive_status"
    assert all((status / f"{name}.done").exists() for name in names)
    assert pushing.failed_calls() == []
    # PostgreSQL's own calls (while archiving was blocked none was traced; the two above were the
    # test's): the first took the full path and found its segment archived; its look-ahead pushed
    # the second again (its marker was used by the test's call), so the rest were all answered
    # from markers.
    calls = [(name, was_full) for name, was_full in pushing.calls() if name in names]
    assert sorted(name for name, _ in calls) == sorted(names), calls  # one call each: none failed
    after = dict(calls)
    assert after[names[0]] and not any(after[name] for name in names[1:]), after
    assert not pushing.markers()
    for name in names:
        assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()


# ---- (f) archive.background: a killed pusher, a failing store -----------------------------------------

def test_a_killed_pusher_costs_a_full_path_call_not_a_failure_or_a_wait(workdir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    made = pushing_cluster(workdir, "file", monkeypatch, archive={"background": True})
    cluster, lock = made.cluster, made.spool / PUSHER_LOCK
    try:
        with archiving_blocked(cluster):
            names = queue_segments(cluster, 4)
            # The first call pushes its own segment and starts the pusher, which pushes the others.
            result = made.push(f"pg_wal/{names[0]}")
            assert result.returncode == 0 and full_path(result.stderr), result.out
            wait_for(lambda: made.markers() >= set(names[1:]), "the pusher to mark the queued segments")
            first = lock_holder(lock)
            assert first
            # Killed while pushing names[2]: its busy file stays, its marker never came.
            os.kill(first, 9)
            wait_for(lambda: lock_holder(lock) is None, "the killed pusher's lock to go")
            (made.spool / names[2]).unlink()
            (made.spool / f"{BUSY_PREFIX}{names[2]}").write_text(f"{first}\n")
            chown_to_db_user(made.spool / f"{BUSY_PREFIX}{names[2]}")
            # A marked segment is still answered from its marker; the busy one is not waited for.
            result = made.push(f"pg_wal/{names[1]}")
            assert result.returncode == 0 and not full_path(result.stderr), result.out
            started = time.monotonic()
            result = made.push(f"pg_wal/{names[2]}")
            assert result.returncode == 0 and full_path(result.stderr), result.out
            assert time.monotonic() - started < 5  # no waiting for the dead pusher (BUSY_WAIT is 60 s)
            # That call started a new pusher, which cleared the dead one's busy file.
            wait_for(lambda: lock_holder(lock) not in (None, first), "a new pusher")
            wait_for(lambda: not (made.spool / f"{BUSY_PREFIX}{names[2]}").exists(), "the stale busy file to go")
        cluster.flush_archive()
        assert made.failed_calls() == []
        for name in names:
            assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()
        assert f"pid {first}: pusher started" in (made.spool / "pusher.log").read_text()
    finally:
        cluster.stop_all()


@pytest.mark.s3_only
def test_with_a_pusher_and_a_failing_store_postgres_hears_archived_only_for_stored_segments(
        workdir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(moto().port, seed=7) as proxy:
        repo = flaky_repo(proxy)
        made = pushing_cluster(workdir, backend, monkeypatch, repo=repo, archive={"background": True})
        cluster = made.cluster
        try:
            with archiving_blocked(cluster):
                names = queue_segments(cluster, 12)
                proxy.set_faults(0.3, ("500", "reset"))
            # PostgreSQL archives the queue through the faults: its calls and the pusher both fail at times.
            status = cluster.pg.pgdata / "pg_wal" / "archive_status"
            wait_for(lambda: all((status / f"{name}.done").exists() for name in names), "the queue to be archived",
                     timeout=300)
            proxy.set_faults(0.0)
            log = (made.spool / "pusher.log").read_text()
            print(log)
            assert "pusher started" in log
            for name in names:  # every segment PostgreSQL was told is archived is stored, byte-exact
                assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()
            for name in made.markers():  # and so is whatever is still marked
                assert stored_raw(cluster, name) == (cluster.pg.pgdata / "pg_wal" / name).read_bytes()
            cluster.flush_archive()
        finally:
            cluster.stop_all()
