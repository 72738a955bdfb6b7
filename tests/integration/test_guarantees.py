"""DESIGN.md's guarantees against real PostgreSQL 15: each test fails if its guarantee breaks.

- wal-push: idempotent retries, no silent overwrite, no foreign system's WAL, .partial never blocks (2)
- backups killed with SIGKILL at several points stay invisible; the next backup removes the debris (3)
- checksums: a flipped byte in a part or a WAL object is an error naming the object, never used (4)
- one backup at a time, refused at once; a SIGKILLed lock holder does not leave the lock stuck
- no leaked secrets in output, process titles or the repository (10)

Every test runs on both backends: a directory, and a fresh versioned bucket on moto_server (where
"unchanged" also means "still exactly one version"). Safe extraction (8) is in
tests/unit/test_tarparts.py, the storage backend in tests/unit/test_file_storage.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest
import zstandard
from conftest import (
    PGVAULT,
    Cluster,
    Result,
    archiving_blocked,
    kill_group,
    make_workdir,
    moto,
    new_cluster,
    new_repo,
    run_pgvault,
    wait_for,
    write_policy,
)
from repos import S3_ENV, FileRepo, RepoHandle, S3Repo, flip_byte, free_port

from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user
from pgvault.pg.wal import parse_long_header
from pgvault.repo.layout import Layout

pytestmark = [pytest.mark.integration]

CLUSTER = "test"  # new_cluster's default cluster name
LAYOUT = Layout(CLUSTER)
LOCK_KEY = f"{CLUSTER}/locks/backup.lock"
PYTHON = str(Path(sys.executable).parent.resolve() / "python")


# ---- helpers ----------------------------------------------------------------------------------------

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


def neighbours(key: str) -> str:
    """The prefix key shares with the objects beside it (its directory, on file)."""
    return key.rsplit("/", 1)[0] + "/"


def stored_under(repo: RepoHandle, prefix: str) -> dict[str, str]:
    """Everything stored under prefix, named relative to it, with its digest: objects, sidecars, temp
    files and directories (file), unfinished multipart uploads (S3, as '<name>:<upload id>')."""
    found: dict[str, str] = {}
    for name, digest in repo.snapshot().items():
        # partition, not removeprefix: S3 names are bucket keys, behind the repository's own prefix.
        _, sep, rest = name.partition(prefix)
        if sep and rest:
            found[rest] = digest
    return found


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


def backups_stored(repo: RepoHandle) -> set[str]:
    """Every backup anything at all is stored for: objects, sidecars, debris, empty directories."""
    return {name.split("/")[0] for name in stored_under(repo, LAYOUT.backups_prefix)}


def backups_begun(repo: RepoHandle) -> set[str]:
    """Backups that stored an object or are writing one (cheap enough to poll, unlike a snapshot)."""
    names = [*repo.keys(LAYOUT.backups_prefix), *repo.debris(LAYOUT.backups_prefix)]
    return {name.partition(LAYOUT.backups_prefix)[2].split("/")[0] for name in names}


def stored_parts(repo: RepoHandle, backup_id: str) -> list[str]:
    return [key for key in repo.keys(LAYOUT.backup_prefix(backup_id)) if key.rsplit("/", 1)[1].startswith("part-")]


def lock_content(repo: RepoHandle) -> str:
    """The backup lock: who holds it, or who held it last; '' once released (the file backend empties
    its lock file, the S3 lease object is deleted)."""
    try:
        return repo.read(LOCK_KEY).decode().strip()
    except (OSError, botocore.exceptions.ClientError):
        return ""


def start_backup(cluster: Cluster, *args: str, argv: list[str] | None = None) -> subprocess.Popen[str]:
    """A backup in its own session, so kill_group reaches runuser and pgvault alike."""
    cmd = argv or [PGVAULT, "--config", str(cluster.config), "-q", "backup", *args]
    return subprocess.Popen(as_db_user(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/tmp", start_new_session=True)


def backup_streams(cluster: Cluster) -> int:
    """Base backup streams in progress (pgvault names its replication connection pgvault-backup-<id>)."""
    return int(cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgvault-backup-%'"))


def waiting_for_wal(cluster: Cluster, proc: subprocess.Popen[str], backup_id: str) -> bool:
    """The backup streamed its parts, its stream is over, and it still runs: it waits for its WAL."""
    assert proc.poll() is None, proc.communicate()
    return bool(stored_parts(cluster.repo, backup_id)) and backup_streams(cluster) == 0


def assert_clean_after_next_backup(cluster: Cluster, killed: str, valid_before: list[str]) -> str:
    """The next backup succeeds, and afterwards only valid backups' objects are in backups/."""
    new_id = cluster.backup()
    repo = cluster.repo
    assert listed_ids(cluster) == [*valid_before, new_id]
    assert backups_stored(repo) == {*valid_before, new_id}, f"debris of killed backup {killed} is still there"
    assert repo.debris(LAYOUT.backups_prefix) == [], "temp files or unfinished uploads of the killed writer remain"
    record = json.loads(cluster.ok("-q", "info", new_id, "--json").stdout)
    expected = {p["key"] for p in record["parts"]} | {LAYOUT.manifest_key(new_id), LAYOUT.sentinel_key(new_id)}
    assert set(repo.keys(LAYOUT.backup_prefix(new_id))) == expected
    # Beside the objects, only their sidecars (each object's on file; S3 keeps most in object metadata).
    names = {key.rsplit("/", 1)[1] for key in expected}
    assert {name.removesuffix(".meta") for name in stored_under(repo, LAYOUT.backup_prefix(new_id))} == names
    for key in expected:
        repo.state(key)  # reads the object with its recorded metadata (on file, its sidecar must be there)
    return new_id


# ---- a cluster shared by the WAL and checksum tests -------------------------------------------------

@pytest.fixture(scope="module")
def archiving(backend: str) -> Iterator[Cluster]:
    workdir = make_workdir()
    made = new_cluster(workdir, backend=backend)
    try:
        made.create_table()
        made.flush_archive()  # segment 1 is archived from here on
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def side_repository(cluster: Cluster, name: str) -> tuple[Path, RepoHandle]:
    """A second, fresh repository of the same backend bound to the same server (same system id)."""
    repo = new_repo(cluster.workdir, cluster.repo.kind, name)
    config = cluster.workdir / f"{name}.yaml"
    write_policy(config, CLUSTER, cluster.pg.conninfo(), repo)
    result = run_pgvault("init", config=config)
    assert result.returncode == 0, result.out
    return config, repo


def unreachable_repositories(workdir: Path, backend: str) -> list[tuple[RepoHandle, str]]:
    """Repositories pgvault cannot reach at all, each with what its error must say."""
    if backend == "s3":
        missing = S3Repo(moto(), bucket=f"pgvault-test-{os.getpid()}-no-such-bucket")
        # A fresh bucket behind an endpoint nobody listens on; one retry, so this takes a second, not a minute.
        dead = S3Repo(moto(), endpoint=f"http://127.0.0.1:{free_port()}", retries=1, retry_window="5s",
                      connect_timeout="1s")
        return [(missing, "does not exist"), (dead, "cannot connect")]
    closed = workdir / "unreadable"
    closed.mkdir(mode=0o700)  # root's: the database user cannot even look inside
    return [(FileRepo(closed), "Permission denied")]


# ---- guarantee 2: no silent overwrite ----------------------------------------------------------------

def test_same_segment_pushed_twice_succeeds_and_stores_one_object(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    source = fetch_to(archiving, name, archiving.db_user_dir("push-twice"))
    config, repo = side_repository(archiving, "repo-twice")
    key = LAYOUT.wal_key(name)

    first = run_pgvault("wal-push", str(source), config=config)
    assert first.returncode == 0, first.out
    state = repo.state(key)
    second = run_pgvault("wal-push", str(source), config=config)
    assert second.returncode == 0, second.out
    assert repo.state(key) == state, "the retry rewrote the object"
    # Nothing else beside it: no second object, no temp file, no unfinished upload.
    assert {n.removesuffix(".meta") for n in stored_under(repo, neighbours(key))} == {f"{name}.zst"}

    # What was stored is what was pushed.
    got = archiving.db_user_dir("push-twice-check") / name
    assert run_pgvault("wal-fetch", name, str(got), config=config).returncode == 0
    assert got.read_bytes() == source.read_bytes()

    # A retry into the live repository, which PostgreSQL itself archived to, is just as idempotent.
    live = archiving.repo.state(key)
    again = archiving.pgvault("wal-push", str(source))
    assert again.returncode == 0, again.out
    assert archiving.repo.state(key) == live


def test_different_content_under_archived_name_fails_loudly_and_changes_nothing(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    original = fetch_to(archiving, name, archiving.db_user_dir("conflict-orig")).read_bytes()
    impostor = write_as_db_user(archiving.db_user_dir("conflict") / name, altered(original))
    key = LAYOUT.wal_key(name)
    before = archiving.repo.state(key)

    result = archiving.pgvault("wal-push", str(impostor))
    assert_archive_command_failed(result)
    assert name in result.stderr
    assert "different content" in result.stderr
    assert archiving.repo.state(key) == before
    assert archiving.repo.debris(neighbours(key)) == []
    assert impostor.read_bytes() == altered(original), "pgvault must leave PostgreSQL's file alone"
    restored = fetch_to(archiving, name, archiving.db_user_dir("conflict-after"))
    assert restored.read_bytes() == original


def test_history_file_is_never_replaced_by_other_content(archiving: Cluster) -> None:
    config, repo = side_repository(archiving, "repo-history")
    name = "00000002.history"
    first = write_as_db_user(archiving.db_user_dir("history-a") / name, b"1\t0/3000000\tno recovery target\n")
    other = write_as_db_user(archiving.db_user_dir("history-b") / name, b"1\t0/5000000\tno recovery target\n")
    key = LAYOUT.wal_key(name)

    assert run_pgvault("wal-push", str(first), config=config).returncode == 0
    before = repo.state(key)
    retry = run_pgvault("wal-push", str(first), config=config)
    assert retry.returncode == 0, retry.out
    conflict = run_pgvault("wal-push", str(other), config=config)
    assert_archive_command_failed(conflict)
    assert name in conflict.stderr
    assert repo.state(key) == before
    assert repo.read(key) == first.read_bytes()


def test_segment_of_another_system_is_refused_and_nothing_stored(archiving: Cluster) -> None:
    foreign = LocalInstance.create(archiving.workdir / "foreign")  # initdb only: its first segment exists
    name = "000000010000000000000001"
    data = (foreign.pgdata / "pg_wal" / name).read_bytes()
    ours = json.loads(archiving.repo.read(LAYOUT.cluster_json))["system_id"]
    theirs = str(parse_long_header(data).system_id)
    assert theirs != ours

    key = LAYOUT.wal_key(name)
    before = archiving.repo.state(key)  # our own segment 1, archived by the fixture
    listing = stored_under(archiving.repo, neighbours(key))
    renamed = "0000000100000000000000E0"  # a name never archived here
    for attempt_name in (name, renamed):
        pushed = write_as_db_user(archiving.db_user_dir(f"foreign-{attempt_name}") / attempt_name, data)
        result = archiving.pgvault("wal-push", str(pushed))
        assert_archive_command_failed(result)
        assert attempt_name in result.stderr
        assert "database system" in result.stderr
        assert theirs in result.stderr and ours in result.stderr, result.stderr

    assert archiving.repo.state(key) == before
    assert stored_under(archiving.repo, neighbours(key)) == listing, "something was stored"
    assert not archiving.repo.exists(LAYOUT.wal_key(renamed))


def test_partial_segment_with_different_content_never_blocks(archiving: Cluster) -> None:
    name = fresh_segment(archiving)
    data = fetch_to(archiving, name, archiving.db_user_dir("partial-src")).read_bytes()
    partial = f"{name}.partial"
    segment_before = archiving.repo.state(LAYOUT.wal_key(name))

    versions = [data, altered(data), altered(data)[:-2] + b"\x07\x07"]
    for n, content in enumerate(versions):
        path = write_as_db_user(archiving.db_user_dir(f"partial-{n}") / partial, content)
        result = archiving.pgvault("wal-push", str(path))
        assert result.returncode == 0, f"push {n} of {partial} failed:\n{result.out}"
        fetched = fetch_to(archiving, partial, archiving.db_user_dir(f"partial-{n}-check"))
        assert fetched.read_bytes() == content
    assert archiving.repo.state(LAYOUT.wal_key(name)) == segment_before


# ---- guarantee 4: checksums ----------------------------------------------------------------------

def test_flipped_byte_in_backup_part_fails_restore_before_writing(archiving: Cluster) -> None:
    backup_id = archiving.backup()
    record = json.loads(archiving.ok("-q", "info", backup_id, "--json").stdout)
    assert len(record["parts"]) > 1
    # The last part: a restore that checked parts only as it extracted them would already have
    # written the others.
    damaged = record["parts"][-1]["key"]
    flip_byte(archiving.repo, damaged)

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
    flip_byte(archiving.repo, key)
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
def big(backend: str) -> Iterator[Cluster]:
    workdir = make_workdir()
    made = new_cluster(workdir, backend=backend)
    try:
        made.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 500000) g")
        made.flush_archive()
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def _session(sid: int) -> list[int]:
    """The pids of a session's processes (start_backup makes each backup a session of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the backup and wait until its processes are gone, zombies reaped too: pgvault's parent
    (runuser) dies with it, and init may reap it a second or more later. These tests are about debris;
    whether the lock is free the moment its holder is killed is the lock test's business."""
    members = _session(proc.pid)
    kill_group(proc)
    proc.wait(timeout=30)
    wait_for(lambda: all(_gone(pid) for pid in members), "the killed processes to be reaped", timeout=30)


def _check_killed(cluster: Cluster, proc: subprocess.Popen[str], killed: str) -> None:
    assert proc.returncode == -9 or proc.returncode == 128 + 9, proc.returncode
    wait_for(lambda: backup_streams(cluster) == 0, "the server to end the killed backup's stream", timeout=10)
    assert not cluster.repo.exists(LAYOUT.sentinel_key(killed))
    assert killed not in listed_ids(cluster)


def _settled_parts(repo: RepoHandle, backup_id: str) -> list[str]:
    """The stored parts, once pgvault has stopped adding any (it may lag behind the server's stream)."""
    seen: list[list[str]] = []

    def settled() -> list[str] | None:
        seen.append(stored_parts(repo, backup_id))
        return seen[-1] if len(seen) > 1 and seen[-1] == seen[-2] and seen[-1] else None

    return wait_for(settled, "pgvault to store the parts", interval=0.5)


def _new_backup(cluster: Cluster, before: set[str]) -> str:
    return wait_for(lambda: next(iter(backups_begun(cluster.repo) - before), None), "the backup's first object")


def test_backup_killed_while_streaming_parts_is_invisible_and_cleaned(big: Cluster) -> None:
    valid = listed_ids(big)
    before = backups_begun(big.repo)
    proc = start_backup(big)
    try:
        killed = _new_backup(big, before)
        wait_for(lambda: big.repo.exists(LAYOUT.part_key(killed, 0)), "the first part", interval=0.005)
    finally:
        _kill(proc)
    _check_killed(big, proc, killed)
    assert not big.repo.exists(LAYOUT.manifest_key(killed)), "the kill came too late to be 'while streaming'"
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


def test_backup_killed_while_server_waits_for_wal_archiving_is_invisible_and_cleaned(big: Cluster) -> None:
    valid = listed_ids(big)
    before = backups_begun(big.repo)
    wait_for(lambda: backup_streams(big) == 0, "earlier backups to finish", interval=0.2)
    with archiving_blocked(big):
        proc = start_backup(big)
        try:
            killed = _new_backup(big, before)
            wait_for(lambda: waiting_for_wal(big, proc, killed), "the backup to wait for its WAL", interval=0.1)
            parts = _settled_parts(big.repo, killed)
        finally:
            _kill(proc)
    _check_killed(big, proc, killed)
    # Every part was stored; only the manifest and the sentinel wait for the WAL.
    assert len(parts) > 5, parts
    assert not big.repo.exists(LAYOUT.manifest_key(killed))
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


# Runs pgvault's own CLI, pausing (so the test can SIGKILL it) just before the sentinel is written.
_PAUSE_BEFORE_SENTINEL = """
import sys, time
from pathlib import Path
from pgvault import cli
from pgvault.repo.file import FileStorage
from pgvault.repo.s3 import S3Storage

marker = Path(sys.argv.pop(1))

def pausing(real_put):
    def put(self, key, data, **kwargs):
        if key.endswith("/backup.json"):
            marker.write_text(key)
            time.sleep(3600)
        return real_put(self, key, data, **kwargs)
    return put

for storage in (FileStorage, S3Storage):
    storage.put = pausing(storage.put)
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
        assert big.repo.exists(LAYOUT.manifest_key(killed))
        assert big.repo.exists(LAYOUT.part_key(killed, 0))
    finally:
        _kill(proc)
    _check_killed(big, proc, killed)
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


def test_backup_killed_mid_upload_leaves_debris_the_next_backup_removes(big: Cluster) -> None:
    # One part for the whole cluster, some MB compressed: on S3 a multipart upload (5 MiB chunks,
    # repos.S3Repo), on file a temp file. Either stays behind a SIGKILL, invisible to listings.
    one_part = big.workdir / "one-part.yaml"
    write_policy(one_part, CLUSTER, big.pg.conninfo(), big.repo, backup={"part_size": "1GiB"})
    valid = listed_ids(big)
    before = backups_begun(big.repo)
    proc = start_backup(big, argv=[PGVAULT, "--config", str(one_part), "-q", "backup"])
    try:
        killed = _new_backup(big, before)
        debris = wait_for(lambda: big.repo.debris(LAYOUT.backup_prefix(killed)), "the first part's upload")
    finally:
        _kill(proc)
    _check_killed(big, proc, killed)
    assert big.repo.debris(LAYOUT.backup_prefix(killed)) == debris
    assert not big.repo.exists(LAYOUT.part_key(killed, 0)), "the kill came too late to be 'mid-upload'"
    assert listed_ids(big) == valid
    assert_clean_after_next_backup(big, killed, valid)


# ---- one backup at a time ---------------------------------------------------------------------------

def test_second_concurrent_backup_is_refused_at_once_and_killed_holder_releases_lock(big: Cluster) -> None:
    valid = listed_ids(big)
    wait_for(lambda: backup_streams(big) == 0, "earlier backups to finish", interval=0.2)
    before = backups_begun(big.repo)
    with archiving_blocked(big):
        first = start_backup(big)
        try:
            # The first backup holds the lock and waits for its WAL until archiving works again.
            first_began = _new_backup(big, before)
            wait_for(lambda: waiting_for_wal(big, first, first_began), "the first backup to wait for its WAL")
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
    assert first_id == first_began
    assert listed_ids(big) == [*valid, first_id]

    # A holder killed with SIGKILL: its pid is still written in the lock (a file, or a lease object on
    # S3), but the lock is free: the kernel dropped the flock, or the lease's holder is gone.
    holder = start_backup(big)
    try:
        info = wait_for(lambda: lock_content(big.repo), "the lock to be taken")
    finally:
        kill_group(holder)
        holder.wait(timeout=30)
    assert json.loads(lock_content(big.repo)) == json.loads(info)
    started = time.monotonic()
    after_kill = big.pgvault("-q", "backup")
    assert after_kill.returncode == 0, f"the killed holder left the lock taken:\n{after_kill.out}"
    assert time.monotonic() - started < 60
    assert listed_ids(big) == [*valid, first_id, after_kill.stdout.strip()]


# ---- guarantee 10: no leaked secrets -----------------------------------------------------------------

SECRET = "SeCrEt-123"
# The conninfo password, and the AWS secret key every subprocess has in its environment.
SECRETS = (SECRET, S3_ENV["AWS_SECRET_ACCESS_KEY"])


def _assert_no_secret(result: Result, what: str) -> None:
    for secret in SECRETS:
        assert secret not in result.stdout, f"{what} printed {secret!r} on stdout:\n{result.stdout}"
        assert secret not in result.stderr, f"{what} printed {secret!r} on stderr:\n{result.stderr}"


def _readable(name: str, data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read() \
        if name.endswith(".zst") else data


def stored_contents(repo: RepoHandle) -> Iterator[tuple[str, bytes]]:
    """Every stored object, decompressed, and what is recorded beside it (sidecar; S3 user metadata);
    on S3 also every earlier version of every object, deleted ones (released leases) included."""
    for key in repo.keys(""):
        yield key, _readable(key, repo.read(key))
        try:
            recorded = repo.state(key)[1:]
        except FileNotFoundError:  # the file backend's lock file has no sidecar
            continue
        yield f"{key} (recorded)", repr(recorded).encode()
    if isinstance(repo, S3Repo):
        pages = repo.client.get_paginator("list_object_versions").paginate(Bucket=repo.bucket)
        for version in (v for page in pages for v in page.get("Versions", [])):
            answer = repo.client.get_object(Bucket=repo.bucket, Key=version["Key"], VersionId=version["VersionId"])
            data = _readable(version["Key"], answer["Body"].read()) + repr(answer["Metadata"]).encode()
            yield f"{version['Key']} version {version['VersionId']}", data


def test_no_secrets_in_output_process_titles_or_repository(workdir: Path, backend: str) -> None:
    made = new_cluster(workdir, backend=backend, init=False)
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
        before = backups_begun(made.repo)
        with archiving_blocked(made):
            proc = start_backup(made, argv=[PGVAULT, "--config", str(made.config), "backup"])
            try:
                began = _new_backup(made, before)
                wait_for(lambda: waiting_for_wal(made, proc, began), "the backup to wait for its WAL")
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
        for secret in SECRETS:
            assert all(secret not in line for line in ps.splitlines()), [r for r in ps.splitlines() if secret in r]

        for args in (("list",), ("list", "--json"), ("info",), ("info", "--json"), ("info", backup_id),
                     ("info", backup_id, "--json")):
            results[" ".join(args)] = made.ok(*args)
        restored = made.next_restore_dir()
        results["restore"] = made.ok("restore", "--pgdata", str(restored))

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
        # A repository that cannot be reached, with the server there.
        for n, (repo, cause) in enumerate(unreachable_repositories(workdir, backend)):
            config = workdir / f"unreachable-{n}.yaml"
            write_policy(config, CLUSTER, f"{made.pg.conninfo()} password={SECRET}", repo)
            segment = made.pg.pgdata / "pg_wal" / "000000010000000000000001"
            for args in (("check",), ("--debug", "list"), ("wal-push", str(segment))):
                failed = run_pgvault(*args, config=config)
                assert failed.returncode == 1, failed.out
                results[f"{config.name} {' '.join(args)}"] = failed
            assert cause in results[f"{config.name} check"].stderr
        # A policy that fails validation elsewhere still must not echo the conninfo.
        invalid = workdir / "invalid.yaml"
        write_policy(invalid, CLUSTER, f"host=127.0.0.1 password={SECRET}", made.repo, backup={"part_size": "1"})
        failed = run_pgvault("check", config=invalid)
        assert failed.returncode == 2, failed.out
        results["invalid check"] = failed

        for what, result in results.items():
            _assert_no_secret(result, what)

        # Nothing in the repository: records, sidecars, metadata, and the contents of every stored object.
        scanned = 0
        for name, data in stored_contents(made.repo):
            for secret in SECRETS:
                assert secret.encode() not in data, f"{name} holds {secret!r}"
            scanned += 1
        assert made.repo.exists(LAYOUT.cluster_json)
        assert made.repo.exists(LAYOUT.sentinel_key(backup_id))
        assert scanned > 10
        # Nor in what restore wrote (its recovery settings included).
        files = [path for path in restored.rglob("*") if path.is_file()]
        assert restored / "postgresql.auto.conf" in files
        for path in files:
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, f"restore wrote {secret!r} into {path}"
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")


def test_backup_gives_up_when_archiving_stays_broken_and_frees_the_lock(workdir: Path, backend: str) -> None:
    stuck = new_cluster(workdir, name="stuck", backend=backend, backup={"part_size": "1MiB", "wal_timeout": "3s"})
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
    # An unmounted repository (on S3: an empty bucket or prefix) must not read as "end of archive":
    # exit 1 would make PostgreSQL end recovery early and promote at the wrong point. Nor may one
    # that cannot be reached at all.
    wrong = "not mounted, or the wrong repository"
    cases = [("unmounted", new_repo(workdir, archiving.repo.kind, "not-mounted"), "test", wrong),
             ("other-cluster", archiving.repo, "no-such-cluster", wrong)]
    cases += [(f"unreachable-{n}", repo, "test", cause)
              for n, (repo, cause) in enumerate(unreachable_repositories(workdir, archiving.repo.kind))]
    for name, repo, cluster, cause in cases:
        config = workdir / f"{name}.yaml"
        write_policy(config, cluster, archiving.pg.conninfo(), repo)
        dest = workdir / f"{name}-segment"
        result = run_pgvault("wal-fetch", "000000010000000000000001", str(dest), config=config)
        assert result.returncode == 255, f"{name}: {result.out}"
        assert cause in result.stderr, f"{name}: {result.stderr}"
        assert "Traceback" not in result.out
        assert not dest.exists()


def test_server_dying_mid_backup_fails_it_cleanly_and_the_next_backup_succeeds(workdir: Path, backend: str) -> None:
    victim = new_cluster(workdir, name="victim", backend=backend, backup={"part_size": "1MiB"})
    try:
        victim.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 500000) g")
        before = backups_begun(victim.repo)
        proc = start_backup(victim)
        try:
            _new_backup(victim, before)  # streaming has begun
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
        assert backups_stored(victim.repo) == {new_id}
        assert victim.repo.debris(LAYOUT.backups_prefix) == []
    finally:
        victim.pg.stop(mode="immediate")


def unwritable_repositories(cluster: Cluster, workdir: Path) -> Iterator[tuple[Path, RepoHandle, str]]:
    """Repositories the database user cannot write to, one at a time, each with the cause pgvault
    must name. On file: an initialized repository whose WAL directory it may only read. S3 has no
    read-only directory (and moto no access policies): a bucket that does not exist, an endpoint
    nobody listens on."""
    if cluster.repo.kind == "file":
        config, repo = side_repository(cluster, "repo-readonly")
        assert isinstance(repo, FileRepo)
        wal_dir = repo.path / LAYOUT.wal_prefix
        wal_dir.mkdir(parents=True, exist_ok=True)
        chown_to_db_user(wal_dir)
        wal_dir.chmod(0o555)  # the database user may read but not write here
        try:
            yield config, repo, "cannot write"
        finally:
            wal_dir.chmod(0o755)
        return
    for n, (repo, cause) in enumerate(unreachable_repositories(workdir, cluster.repo.kind)):
        config = workdir / f"unwritable-{n}.yaml"
        write_policy(config, CLUSTER, cluster.pg.conninfo(), repo)
        yield config, repo, cause


def test_push_into_an_unwritable_repository_fails_and_stores_nothing(archiving: Cluster, workdir: Path) -> None:
    name = fresh_segment(archiving)
    source = fetch_to(archiving, name, archiving.db_user_dir("push-readonly"))
    for config, repo, cause in unwritable_repositories(archiving, workdir):
        result = run_pgvault("wal-push", str(source), config=config)
        # PostgreSQL keeps the segment and retries: a plain failure, said in one line.
        assert result.returncode == 1, result.out
        assert cause in result.stderr and "Traceback" not in result.out, result.stderr
        assert not repo.exists(LAYOUT.wal_key(name))
