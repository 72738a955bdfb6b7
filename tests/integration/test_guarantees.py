"""DESIGN.md's guarantees against real PostgreSQL 15: each test fails if its guarantee breaks.

- wal-push: idempotent retries, no silent overwrite, no foreign system's WAL, .partial never blocks (2)
- backups killed with SIGKILL at several points stay invisible; the next backup removes the debris (3)
- checksums: a flipped byte in a part or a WAL object is an error naming the object, never used (4)
- one backup at a time, refused at once; a SIGKILLed lock holder does not leave the lock stuck
- no leaked secrets in output, process titles or the repository (10)

Safe extraction (8) is in tests/unit/test_tarparts.py, the storage backend in tests/unit/test_file_storage.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import (
    PGVAULT,
    Cluster,
    Result,
    kill_group,
    make_workdir,
    new_cluster,
    run_pgvault,
    write_policy,
)

from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user
from pgvault.pg.wal import parse_long_header
from pgvault.repo.layout import Layout

pytestmark = [pytest.mark.integration]

CLUSTER = "test"  # new_cluster's default cluster name
LAYOUT = Layout(CLUSTER)
PYTHON = str(Path(sys.executable).parent.resolve() / "python")


# ---- helpers ----------------------------------------------------------------------------------------

def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def fresh_segment(cluster: Cluster) -> str:
    """Write something, switch WAL and wait until that segment is archived; return its name."""
    cluster.commit_batch(1)
    report = json.loads(cluster.ok("-q", "check", "--json").stdout)
    return next(c["result"] for c in report["checks"] if c["check"] == "WAL archived")


def fetch_to(cluster: Cluster, name: str, directory: Path, as_name: str | None = None) -> Path:
    dest = directory / (as_name or name)
    cluster.ok("wal-fetch", name, str(dest))
    return dest


def write_as_db_user(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    chown_to_db_user(path)
    return path


def object_path(repo: Path, key: str) -> Path:
    return repo / key


def object_state(repo: Path, key: str) -> tuple[bytes, bytes, int]:
    """An object's bytes, its .meta sidecar and inode: what "unchanged" compares."""
    path = object_path(repo, key)
    return path.read_bytes(), path.with_name(path.name + ".meta").read_bytes(), path.stat().st_ino


def temp_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".tmp.*"))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.chown(path, st.st_uid, st.st_gid)


def altered(data: bytes) -> bytes:
    """The same segment with one byte changed past its page header (header checks still pass)."""
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    return bytes(changed)


def assert_archive_command_failed(result: Result) -> None:
    # Non-zero so PostgreSQL keeps the file and retries; below 126, since PostgreSQL takes higher codes
    # for a signal and would restart its archiver.
    assert 0 < result.returncode < 126, result.out
    assert "Traceback" not in result.out


def listed_ids(cluster: Cluster) -> list[str]:
    return [b["id"] for b in json.loads(cluster.ok("-q", "list", "--json").stdout)["backups"]]


def backup_dirs(cluster: Cluster) -> set[str]:
    backups = cluster.repo / LAYOUT.backups_prefix
    return {p.name for p in backups.iterdir()} if backups.is_dir() else set()


def start_backup(cluster: Cluster, *args: str, argv: list[str] | None = None) -> subprocess.Popen[str]:
    """A backup in its own session, so kill_group reaches runuser and pgvault alike."""
    cmd = argv or [PGVAULT, "--config", str(cluster.config), "-q", "backup", *args]
    return subprocess.Popen(as_db_user(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/tmp", start_new_session=True)


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def backup_streams(cluster: Cluster) -> int:
    """Base backup streams in progress (pgvault names its replication connection pgvault-backup-<id>)."""
    return int(cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgvault-backup-%'"))


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
        cluster.sql(f"ALTER SYSTEM SET archive_command = {sql_literal(original)}")
        cluster.sql("SELECT pg_reload_conf()")
        wait_for(lambda: cluster.sql("SHOW archive_command") == original, "archive_command restored")


def waiting_for_wal(cluster: Cluster, proc: subprocess.Popen[str], backup_dir: Path) -> bool:
    """The backup streamed its parts, its stream is over, and it still runs: it waits for its WAL."""
    assert proc.poll() is None, proc.communicate()
    return any(backup_dir.glob("part-*.tar.zst")) and backup_streams(cluster) == 0


def assert_clean_after_next_backup(cluster: Cluster, killed: str, valid_before: list[str]) -> str:
    """The next backup succeeds, and afterwards only valid backups' objects are in backups/."""
    new_id = cluster.backup()
    assert listed_ids(cluster) == [*valid_before, new_id]
    assert backup_dirs(cluster) == {*valid_before, new_id}, f"debris of killed backup {killed} is still there"
    backups = cluster.repo / LAYOUT.backups_prefix
    assert temp_files(backups) == [], "temp files of the killed writer are still there"
    record = json.loads(cluster.ok("-q", "info", new_id, "--json").stdout)
    expected = {Path(p["key"]).name for p in record["parts"]} | {"backup_manifest.zst", "backup.json"}
    found = {p.name for p in (backups / new_id).iterdir()}
    assert found == expected | {f"{name}.meta" for name in expected}
    return new_id


# ---- a cluster shared by the WAL and checksum tests -------------------------------------------------

@pytest.fixture(scope="module")
def archiving() -> Iterator[Cluster]:
    workdir = make_workdir()
    made = new_cluster(workdir)
    try:
        made.create_table()
        made.flush_archive()  # segment 1 is archived from here on
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def side_repository(cluster: Cluster, name: str) -> Path:
    """A second, fresh repository bound to the same server (same system id)."""
    config = cluster.workdir / f"{name}.yaml"
    write_policy(config, CLUSTER, cluster.pg.conninfo(), cluster.workdir / name)
    result = run_pgvault("init", config=config)
    assert result.returncode == 0, result.out
    return config


# ---- guarantee 2: no silent overwrite ----------------------------------------------------------------

def test_same_segment_pushed_twice_succeeds_and_stores_one_object(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    source = fetch_to(archiving, name, archiving.db_user_dir("push-twice"))
    config = side_repository(archiving, "repo-twice")
    repo = archiving.workdir / "repo-twice"
    key = LAYOUT.wal_key(name)

    first = run_pgvault("wal-push", str(source), config=config)
    assert first.returncode == 0, first.out
    state = object_state(repo, key)
    second = run_pgvault("wal-push", str(source), config=config)
    assert second.returncode == 0, second.out
    assert object_state(repo, key) == state, "the retry rewrote the object"
    assert sorted(p.name for p in object_path(repo, key).parent.iterdir()) == [f"{name}.zst", f"{name}.zst.meta"]

    # What was stored is what was pushed.
    got = archiving.db_user_dir("push-twice-check") / name
    assert run_pgvault("wal-fetch", name, str(got), config=config).returncode == 0
    assert got.read_bytes() == source.read_bytes()

    # A retry into the live repository, which PostgreSQL itself archived to, is just as idempotent.
    live = object_state(archiving.repo, key)
    again = archiving.pgvault("wal-push", str(source))
    assert again.returncode == 0, again.out
    assert object_state(archiving.repo, key) == live


def test_different_content_under_archived_name_fails_loudly_and_changes_nothing(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    original = fetch_to(archiving, name, archiving.db_user_dir("conflict-orig")).read_bytes()
    impostor = write_as_db_user(archiving.db_user_dir("conflict") / name, altered(original))
    key = LAYOUT.wal_key(name)
    before = object_state(archiving.repo, key)

    result = archiving.pgvault("wal-push", str(impostor))
    assert_archive_command_failed(result)
    assert name in result.stderr
    assert "different content" in result.stderr
    assert object_state(archiving.repo, key) == before
    assert temp_files(object_path(archiving.repo, key).parent) == []
    assert impostor.read_bytes() == altered(original), "pgvault must leave PostgreSQL's file alone"
    restored = fetch_to(archiving, name, archiving.db_user_dir("conflict-after"))
    assert restored.read_bytes() == original


def test_history_file_is_never_replaced_by_other_content(archiving: Cluster) -> None:
    config = side_repository(archiving, "repo-history")
    repo = archiving.workdir / "repo-history"
    name = "00000002.history"
    first = write_as_db_user(archiving.db_user_dir("history-a") / name, b"1\t0/3000000\tno recovery target\n")
    other = write_as_db_user(archiving.db_user_dir("history-b") / name, b"1\t0/5000000\tno recovery target\n")
    key = LAYOUT.wal_key(name)

    assert run_pgvault("wal-push", str(first), config=config).returncode == 0
    before = object_state(repo, key)
    retry = run_pgvault("wal-push", str(first), config=config)
    assert retry.returncode == 0, retry.out
    conflict = run_pgvault("wal-push", str(other), config=config)
    assert_archive_command_failed(conflict)
    assert name in conflict.stderr
    assert object_state(repo, key) == before
    assert object_path(repo, key).read_bytes() == first.read_bytes()


def test_segment_of_another_system_is_refused_and_nothing_stored(archiving: Cluster) -> None:
    foreign = LocalInstance.create(archiving.workdir / "foreign")  # initdb only: its first segment exists
    name = "000000010000000000000001"
    data = (foreign.pgdata / "pg_wal" / name).read_bytes()
    ours = json.loads((archiving.repo / LAYOUT.cluster_json).read_bytes())["system_id"]
    theirs = str(parse_long_header(data).system_id)
    assert theirs != ours

    key = LAYOUT.wal_key(name)
    before = object_state(archiving.repo, key)  # our own segment 1, archived by the fixture
    wal_dir = object_path(archiving.repo, key).parent
    listing = sorted(p.name for p in wal_dir.iterdir())
    renamed = "0000000100000000000000E0"  # a name never archived here
    for attempt_name in (name, renamed):
        pushed = write_as_db_user(archiving.db_user_dir(f"foreign-{attempt_name}") / attempt_name, data)
        result = archiving.pgvault("wal-push", str(pushed))
        assert_archive_command_failed(result)
        assert attempt_name in result.stderr
        assert "database system" in result.stderr
        assert theirs in result.stderr and ours in result.stderr, result.stderr

    assert object_state(archiving.repo, key) == before
    assert sorted(p.name for p in wal_dir.iterdir()) == listing, "something was stored"
    assert not object_path(archiving.repo, LAYOUT.wal_key(renamed)).exists()


def test_partial_segment_with_different_content_never_blocks(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    data = fetch_to(archiving, name, archiving.db_user_dir("partial-src")).read_bytes()
    partial = f"{name}.partial"
    segment_before = object_state(archiving.repo, LAYOUT.wal_key(name))

    versions = [data, altered(data), altered(data)[:-2] + b"\x07\x07"]
    for n, content in enumerate(versions):
        path = write_as_db_user(archiving.db_user_dir(f"partial-{n}") / partial, content)
        result = archiving.pgvault("wal-push", str(path))
        assert result.returncode == 0, f"push {n} of {partial} failed:\n{result.out}"
        fetched = fetch_to(archiving, partial, archiving.db_user_dir(f"partial-{n}-check"))
        assert fetched.read_bytes() == content
    assert object_state(archiving.repo, LAYOUT.wal_key(name)) == segment_before


# ---- guarantee 4: checksums ----------------------------------------------------------------------

def test_flipped_byte_in_backup_part_fails_restore_before_writing(archiving: Cluster) -> None:
    backup_id = archiving.backup()
    record = json.loads(archiving.ok("-q", "info", backup_id, "--json").stdout)
    assert len(record["parts"]) > 1
    # The last part: a restore that checked parts only as it extracted them would already have
    # written the others.
    damaged = record["parts"][-1]["key"]
    flip_byte(object_path(archiving.repo, damaged))

    missing = archiving.workdir / "restore-damaged"
    result = archiving.pgvault("restore", "--pgdata", str(missing))
    assert result.returncode == 1, result.out
    assert damaged in result.stderr
    assert "Traceback" not in result.out
    assert not missing.exists()

    empty = archiving.db_user_dir("restore-damaged-empty")
    result = archiving.pgvault("restore", "--pgdata", str(empty))
    assert result.returncode == 1, result.out
    assert damaged in result.stderr
    assert list(empty.iterdir()) == []


def test_flipped_byte_in_wal_object_stops_wal_fetch_and_missing_segment_is_silent(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    key = LAYOUT.wal_key(name)
    flip_byte(object_path(archiving.repo, key))
    target = archiving.db_user_dir("fetch-damaged")

    result = archiving.pgvault("wal-fetch", name, str(target / "RECOVERYXLOG"))
    assert result.returncode == 255, result.out  # cli.WAL_FETCH_ERROR_EXIT: recovery must stop
    assert key in result.stderr
    assert "Traceback" not in result.out
    assert list(target.iterdir()) == [], "wal-fetch wrote something from a damaged object"

    for never_archived in ("0000000100000000000000F0", "00000009.history"):
        result = archiving.pgvault("wal-fetch", never_archived, str(target / "RECOVERYXLOG"))
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    assert list(target.iterdir()) == []


# ---- a cluster of some tens of MB for the backup tests --------------------------------------------

@pytest.fixture(scope="module")
def big() -> Iterator[Cluster]:
    workdir = make_workdir()
    made = new_cluster(workdir)
    try:
        made.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 500000) g")
        made.flush_archive()
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc: subprocess.Popen[str]) -> None:
    kill_group(proc)
    proc.wait(timeout=30)


def _check_killed(cluster: Cluster, proc: subprocess.Popen[str], killed: str) -> None:
    assert proc.returncode == -9 or proc.returncode == 128 + 9, proc.returncode
    wait_for(lambda: backup_streams(cluster) == 0, "the server to end the killed backup's stream", timeout=10)
    killed_dir = cluster.repo / LAYOUT.backup_prefix(killed)
    assert not (killed_dir / "backup.json").exists()
    assert killed not in listed_ids(cluster)


def _settled_parts(directory: Path) -> list[str]:
    """The stored parts, once pgvault has stopped adding any (it may lag behind the server's stream)."""
    seen: list[list[str]] = []

    def settled() -> list[str] | None:
        seen.append(sorted(p.name for p in directory.glob("part-*.tar.zst")))
        return seen[-1] if len(seen) > 1 and seen[-1] == seen[-2] and seen[-1] else None

    return wait_for(settled, "pgvault to store the parts", interval=0.5)


def _new_backup_dir(cluster: Cluster, before: set[str]) -> str:
    return wait_for(lambda: next(iter(backup_dirs(cluster) - before), None), "the backup's directory")


def test_backup_killed_while_streaming_parts_is_invisible_and_cleaned(big: Cluster) -> None:
    valid = listed_ids(big)
    before = backup_dirs(big)
    proc = start_backup(big)
    try:
        killed = _new_backup_dir(big, before)
        wait_for((big.repo / LAYOUT.part_key(killed, 0)).exists, "the first part", interval=0.005)
    finally:
        _kill(proc)
    _check_killed(big, proc, killed)
    stored = {p.name for p in (big.repo / LAYOUT.backup_prefix(killed)).iterdir()}
    assert "backup_manifest.zst" not in stored, "the kill came too late to be 'while streaming'"
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


def test_backup_killed_while_server_waits_for_wal_archiving_is_invisible_and_cleaned(big: Cluster) -> None:
    valid = listed_ids(big)
    before = backup_dirs(big)
    wait_for(lambda: backup_streams(big) == 0, "earlier backups to finish", interval=0.2)
    with archiving_blocked(big):
        proc = start_backup(big)
        try:
            killed = _new_backup_dir(big, before)
            backup_dir = big.repo / LAYOUT.backup_prefix(killed)
            wait_for(lambda: waiting_for_wal(big, proc, backup_dir), "the backup to wait for its WAL", interval=0.1)
            parts = _settled_parts(backup_dir)
        finally:
            _kill(proc)
    _check_killed(big, proc, killed)
    # Every part was stored; only the manifest and the sentinel wait for the WAL.
    assert len(parts) > 5, parts
    assert not (big.repo / LAYOUT.manifest_key(killed)).exists()
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


# Runs pgvault's own CLI, pausing (so the test can SIGKILL it) just before the sentinel is written.
_PAUSE_BEFORE_SENTINEL = """
import sys, time
from pathlib import Path
from pgvault import cli
from pgvault.repo.file import FileStorage

marker = Path(sys.argv.pop(1))
real_put = FileStorage.put

def put(self, key, data, **kwargs):
    if key.endswith("/backup.json"):
        marker.write_text(key)
        time.sleep(3600)
    return real_put(self, key, data, **kwargs)

FileStorage.put = put
cli.main()
"""


def test_backup_killed_after_manifest_before_sentinel_is_invisible_and_cleaned(big: Cluster) -> None:
    valid = listed_ids(big)
    marker = big.workdir / "about-to-write-sentinel"
    proc = start_backup(big, argv=[PYTHON, "-c", _PAUSE_BEFORE_SENTINEL, str(marker), "--config", str(big.config),
                                   "-q", "backup"])
    try:
        wait_for(marker.exists, "the backup to reach its sentinel", timeout=120, interval=0.05)
        killed = marker.read_text().split("/")[-2]
        killed_dir = big.repo / LAYOUT.backup_prefix(killed)
        assert (killed_dir / "backup_manifest.zst").exists()
        assert (killed_dir / "part-00000.tar.zst").exists()
    finally:
        _kill(proc)
    _check_killed(big, proc, killed)
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


# ---- one backup at a time ---------------------------------------------------------------------------

def test_second_concurrent_backup_is_refused_at_once_and_killed_holder_releases_lock(big: Cluster) -> None:
    valid = listed_ids(big)
    wait_for(lambda: backup_streams(big) == 0, "earlier backups to finish", interval=0.2)
    before = backup_dirs(big)
    with archiving_blocked(big):
        first = start_backup(big)
        try:
            # The first backup holds the lock and waits for its WAL until archiving works again.
            first_dir = big.repo / LAYOUT.backup_prefix(_new_backup_dir(big, before))
            wait_for(lambda: waiting_for_wal(big, first, first_dir), "the first backup to wait for its WAL")
            started = time.monotonic()
            second = big.pgvault("-q", "backup")
            took = time.monotonic() - started
        except BaseException:
            kill_group(first)
            raise
    assert second.returncode == 1, second.out
    assert "another backup" in second.stderr and "is running" in second.stderr, second.stderr
    assert took < 3, f"the second backup took {took:.1f}s to be refused"
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    first_id = out.strip()
    assert listed_ids(big) == [*valid, first_id]

    # A holder killed with SIGKILL: its pid is still written in the lock file, but the lock is free.
    lock = big.repo / CLUSTER / "locks" / "backup.lock"
    holder = start_backup(big)
    try:
        info = wait_for(lambda: lock.read_text().strip(), "the lock to be taken")
    finally:
        kill_group(holder)
        holder.wait(timeout=30)
    assert json.loads(lock.read_text()) == json.loads(info)
    started = time.monotonic()
    next_id = big.backup()
    assert time.monotonic() - started < 60
    assert listed_ids(big) == [*valid, first_id, next_id]


# ---- guarantee 10: no leaked secrets -----------------------------------------------------------------

SECRET = "SeCrEt-123"


def _assert_no_secret(result: Result, what: str) -> None:
    assert SECRET not in result.stdout, f"{what} printed the password on stdout:\n{result.stdout}"
    assert SECRET not in result.stderr, f"{what} printed the password on stderr:\n{result.stderr}"


def test_no_secrets_in_output_process_titles_or_repository(workdir: Path) -> None:
    made = new_cluster(workdir, init=False)
    try:
        # trust auth: the password is never checked, but pgvault must carry it everywhere and show it nowhere.
        write_policy(made.config, CLUSTER, f"{made.pg.conninfo()} password={SECRET}", made.repo,
                     backup={"part_size": "1MiB"})
        assert SECRET in made.config.read_text()
        results: dict[str, Result] = {}
        results["init"] = made.ok("init")
        made.create_table()
        made.commit_batch()
        results["check"] = made.ok("check")
        results["check --json"] = made.ok("check", "--json")

        # A backup (with progress output) held in place while it waits for its WAL, so ps can see it.
        before = backup_dirs(made)
        with archiving_blocked(made):
            proc = start_backup(made, argv=[PGVAULT, "--config", str(made.config), "backup"])
            try:
                new_dir = made.repo / LAYOUT.backup_prefix(_new_backup_dir(made, before))
                wait_for(lambda: waiting_for_wal(made, proc, new_dir), "the backup to wait for its WAL")
                ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
            except BaseException:
                kill_group(proc)
                raise
        stdout, stderr = proc.communicate(timeout=120)
        results["backup"] = Result(proc.returncode, stdout, stderr)
        assert proc.returncode == 0, stderr
        backup_id = stdout.strip()

        ours = [line for line in ps.splitlines() if "backup" in line and str(made.config) in line]
        assert ours, f"the backup was not seen in ps: {ps}"
        # No process of any kind shows it: pgvault passes it to libpq, never on a command line.
        assert all(SECRET not in line for line in ps.splitlines()), [row for row in ps.splitlines() if SECRET in row]

        for args in (("list",), ("list", "--json"), ("info",), ("info", "--json"), ("info", backup_id),
                     ("info", backup_id, "--json")):
            results[" ".join(args)] = made.ok(*args)

        # Failing commands: a server that is not there, as a keyword conninfo and as a URI.
        bad_keyword = workdir / "bad-keyword.yaml"
        write_policy(bad_keyword, CLUSTER, f"host=127.0.0.1 port=1 user=postgres dbname=postgres password={SECRET}",
                     made.repo)
        bad_uri = workdir / "bad-uri.yaml"
        write_policy(bad_uri, CLUSTER, f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres", made.repo)
        for config in (bad_keyword, bad_uri):
            for args in (("check",), ("backup",), ("--debug", "check"), ("init",)):
                failed = run_pgvault(*args, config=config)
                assert failed.returncode == 1, failed.out
                assert "cannot connect" in failed.stderr, failed.stderr
                results[f"{config.name} {' '.join(args)}"] = failed
        # A policy that fails validation elsewhere still must not echo the conninfo.
        invalid = workdir / "invalid.yaml"
        write_policy(invalid, CLUSTER, f"host=127.0.0.1 password={SECRET}", made.repo, backup={"part_size": "1"})
        failed = run_pgvault("check", config=invalid)
        assert failed.returncode == 2, failed.out
        results["invalid check"] = failed

        for what, result in results.items():
            _assert_no_secret(result, what)

        # Nothing in the repository: records, sidecars, and the contents of every stored object.
        scanned = 0
        for path in made.repo.rglob("*"):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
            assert SECRET.encode() not in data, f"{path} holds the password"
            scanned += 1
        assert (made.repo / LAYOUT.cluster_json).is_file()
        assert (made.repo / LAYOUT.sentinel_key(backup_id)).is_file()
        assert scanned > 10
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")


def test_backup_gives_up_when_archiving_stays_broken_and_frees_the_lock(workdir: Path) -> None:
    stuck = new_cluster(workdir, name="stuck", backup={"part_size": "1MiB", "wal_timeout": "3s"})
    try:
        with archiving_blocked(stuck):
            started = time.monotonic()
            result = stuck.pgvault("-q", "backup")
            took = time.monotonic() - started
            assert result.returncode == 1, result.out
            assert "archiving is broken" in result.stderr
            assert "Traceback" not in result.out
            # 3 s of waiting plus the watchdog's 1 s polling and the backup itself, never forever.
            assert took < 30
            assert listed_ids(stuck) == []
        # Archiving works again: the lock is free and the next backup completes.
        new_id = stuck.backup()
        assert listed_ids(stuck) == [new_id]
    finally:
        stuck.pg.stop(mode="immediate")


def test_wal_fetch_from_a_missing_repository_stops_recovery_instead_of_ending_it(
    archiving: Cluster, workdir: Path
) -> None:
    # An unmounted repository must not read as "end of archive": exit 1 would make PostgreSQL end
    # recovery early and promote at the wrong point.
    for name, repo in (("unmounted", workdir / "not-mounted"), ("other-cluster", archiving.repo)):
        config = workdir / f"{name}.yaml"
        write_policy(config, "no-such-cluster" if name == "other-cluster" else "test",
                     archiving.pg.conninfo(), repo)
        dest = workdir / f"{name}-segment"
        result = run_pgvault("wal-fetch", "000000010000000000000001", str(dest), config=config)
        assert result.returncode == 255, result.out
        assert "not mounted, or the wrong repository" in result.stderr
        assert not dest.exists()


def test_server_dying_mid_backup_fails_it_cleanly_and_the_next_backup_succeeds(workdir: Path) -> None:
    victim = new_cluster(workdir, name="victim", backup={"part_size": "1MiB"})
    try:
        victim.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 500000) g")
        before = backup_dirs(victim)
        proc = start_backup(victim)
        try:
            _new_backup_dir(victim, before)  # streaming has begun
            victim.pg.stop(mode="immediate")
            _out, err = proc.communicate(timeout=120)
        finally:
            kill_group(proc)
        assert proc.returncode == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert "error: unexpected" not in err, err  # the marker of an unhandled exception
        assert listed_ids(victim) == []
        victim.pg.start()
        new_id = victim.backup()
        assert listed_ids(victim) == [new_id]
        assert backup_dirs(victim) == {new_id}
    finally:
        victim.pg.stop(mode="immediate")


def test_push_into_an_unwritable_repository_fails_and_stores_nothing(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    source = fetch_to(archiving, name, archiving.db_user_dir("push-readonly"))
    config = side_repository(archiving, "repo-readonly")
    repo = archiving.workdir / "repo-readonly"
    wal_dir = repo / LAYOUT.wal_prefix
    wal_dir.mkdir(parents=True, exist_ok=True)
    chown_to_db_user(wal_dir)
    wal_dir.chmod(0o555)  # the database user may read but not write here
    try:
        result = run_pgvault("wal-push", str(source), config=config)
    finally:
        wal_dir.chmod(0o755)
    # PostgreSQL keeps the segment and retries: a plain failure, said in one line.
    assert result.returncode == 1, result.out
    assert "cannot write" in result.stderr and "Traceback" not in result.out
    assert not object_path(repo, LAYOUT.wal_key(name)).exists()
