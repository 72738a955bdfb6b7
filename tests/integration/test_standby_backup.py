"""Backups from a streaming standby (a Patroni replica): the primary switches WAL, not archive_timeout.

One primary archives into the repository; a standby made from it with pg_basebackup -R streams
from it and archives nothing (archive_mode=on, as on a Patroni replica). The primary's
archive_timeout is an hour, so a standby backup whose last segment the primary is still writing
can only finish quickly if pgvault switches WAL on the primary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Cluster,
    Marks,
    Result,
    kill_group,
    make_workdir,
    new_cluster,
    rows_of,
    start_standby,
    wait_for,
    write_policy,
)
from repos import RepoHandle

from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user
from pgvault.pg.wal import Lsn, WalSegment, parse_history
from pgvault.repo.layout import Layout

pytestmark = [pytest.mark.integration]

CLUSTER = "test"  # new_cluster's default cluster name
LAYOUT = Layout(CLUSTER)
LOCK_KEY = f"{CLUSTER}/locks/backup.lock"
# trust auth never checks it; pgvault must carry it to libpq and show it nowhere.
SECRET = "SeCrEt-primary-42"


@dataclass
class Pair:
    workdir: Path
    primary: Cluster  # pgvault's policy for the primary: archive_command and `check` on the primary
    standby: LocalInstance
    handles: list[Cluster] = field(default_factory=list)

    @property
    def repo(self) -> RepoHandle:
        return self.primary.repo

    def on_standby(self, name: str, *, primary_conninfo: str | None, wal_timeout: str = "5m") -> Cluster:
        """A policy whose postgres.conninfo is the standby (same cluster, same repository)."""
        config = self.workdir / f"{name}.yaml"
        postgres: dict[str, Any] = {"conninfo": self.standby.conninfo()}
        if primary_conninfo is not None:
            postgres["primary_conninfo"] = primary_conninfo
        write_policy(config, CLUSTER, self.standby.conninfo(), self.repo, postgres=postgres,
                     backup={"part_size": "1MiB", "wal_timeout": wal_timeout})
        handle = Cluster(workdir=self.workdir, pg=self.standby, config=config, repo=self.repo)
        self.handles.append(handle)
        return handle

    def primary_conninfo(self) -> str:
        return f"{self.primary.pg.conninfo()} password={SECRET}"

    def settle(self) -> WalSegment:
        """Checkpoint on the primary and wait until the standby replayed it; returns the primary's
        current segment, which no archiver has yet (nothing switches WAL on its own here).

        The checkpoint makes the standby's backup start (a restartpoint) and end point lie in that
        segment, as they would on a busy cluster.
        """
        self.primary.sql("CHECKPOINT")
        lsn = Lsn.parse(self.primary.sql("SELECT pg_current_wal_insert_lsn()"))
        deadline = time.monotonic() + 60
        while Lsn.parse(self.standby.psql("SELECT pg_last_wal_replay_lsn()")) < lsn:
            assert time.monotonic() < deadline, "the standby did not replay the primary's WAL within 60 s"
            time.sleep(0.05)
        current = WalSegment.containing(1, lsn)
        assert not self.repo.exists(LAYOUT.wal_key(current.name)), "the segment was archived already"
        return current


@pytest.fixture(scope="module")
def pair(backend: str) -> Iterator[Pair]:
    workdir = make_workdir()
    # archive_timeout 1h: only a WAL switch gets the primary's current segment archived in time.
    primary = new_cluster(workdir, backend=backend, settings={"archive_timeout": "1h", "autovacuum": "off"})
    made = Pair(workdir, primary, start_standby(primary))
    try:
        yield made
    finally:
        for handle in made.handles:
            handle.stop_all()
        primary.stop_all()


def _sentinels(repo: RepoHandle) -> set[str]:
    return {key for key in repo.keys(LAYOUT.backups_prefix) if key.endswith("/backup.json")}


def _no_secret(*results: Result) -> None:
    for result in results:
        assert SECRET not in result.out, result.out


def test_standby_backup_switches_wal_on_the_primary_and_restores_to_a_time(pair: Pair) -> None:
    primary = pair.primary
    primary.create_table("a")
    before = primary.commit_batches(2, pause=0.3, table="a")
    last = pair.settle()
    handle = pair.on_standby("with-primary", primary_conninfo=pair.primary_conninfo())

    started = time.monotonic()
    result = handle.ok("backup", "--json")
    took = time.monotonic() - started
    record = json.loads(result.stdout)
    # archive_timeout is an hour and wal_timeout 5 minutes: only the switch makes this quick.
    assert took < 30, f"the standby backup took {took:.0f} s:\n{result.stderr}"
    assert "switched WAL on the primary" in result.stderr, result.stderr
    assert record["from_standby"] is True
    assert record["stop_wal"] == last.name
    assert record["timeline"] == 1
    # Read on the standby after the backup: the primary's transactions as replayed there.
    assert record["next_xid"] > before[-1].xid
    assert primary.repo.exists(LAYOUT.wal_key(last.name))
    _no_secret(result)

    after = primary.commit_batches(3, pause=0.4, table="a")
    primary.flush_archive()
    restored_json, restored = handle.restore_json("--target-time", after[1].between_next.isoformat())
    assert restored_json["backup_id"] == record["id"]
    assert rows_of(restored, "a") == after.rows_through(1, base=before.rows_through(len(before) - 1))


def test_standby_backup_without_primary_conninfo_says_why_it_waits_and_leaves_no_sentinel(pair: Pair) -> None:
    pair.primary.create_table("b")
    pair.primary.commit_batch(table="b")
    last = pair.settle()
    handle = pair.on_standby("without-primary", primary_conninfo=None, wal_timeout="5s")
    sentinels = _sentinels(pair.repo)

    result = handle.pgvault("backup")  # not -q: the progress line is part of what it must say
    assert result.returncode == 1, result.out
    assert "Traceback" not in result.out
    assert f"waiting (up to backup.wal_timeout) for the primary to archive {last.name}" in result.stderr
    assert "archive_timeout" in result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert f"WAL segment {last.name}" in error and "within 5 s" in error, error
    assert "the server is a standby" in error, error
    hint = next(line for line in result.stderr.splitlines() if line.startswith("hint: "))
    assert "postgres.primary_conninfo" in hint, hint

    assert _sentinels(pair.repo) == sentinels
    assert not pair.repo.exists(LAYOUT.wal_key(last.name))  # nothing switched it meanwhile
    # The lock is free: released (the file backend empties its lock file, S3 deletes the lease)...
    assert not pair.repo.exists(LOCK_KEY) or pair.repo.read(LOCK_KEY).strip() == b""
    # ...and the next backup, which may switch WAL on the primary, takes it and completes.
    done = pair.on_standby("retry", primary_conninfo=pair.primary_conninfo()).backup()
    assert _sentinels(pair.repo) == sentinels | {LAYOUT.sentinel_key(done)}


@pytest.mark.file_only  # refused before the repository is touched: the same on every backend
def test_primary_conninfo_naming_a_standby_or_another_system_is_refused_before_anything_is_written(
    pair: Pair,
) -> None:
    second = start_standby(pair.primary, "standby2")
    other = LocalInstance.create(pair.workdir / "other")  # another database system
    try:
        other.start()
        cases = [
            ("another-standby", f"{second.conninfo()} password={SECRET}", ("in recovery", "not the primary")),
            ("another-system", f"{other.conninfo()} password={SECRET}", ("postgres.primary_conninfo names database "
                                                                         "system", "standby (postgres.conninfo)")),
            ("unreachable", f"host=127.0.0.1 port=1 user=postgres password={SECRET}",
             ("cannot use the primary (postgres.primary_conninfo)",)),
        ]
        for name, conninfo, said in cases:
            handle = pair.on_standby(name, primary_conninfo=conninfo)
            before = pair.repo.snapshot()
            for args in (("-q", "backup"), ("check",)):
                result = handle.pgvault(*args)
                assert result.returncode == 1, f"{name} {args}: {result.out}"
                assert "Traceback" not in result.out
                error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
                for words in said:
                    assert words in error, f"{name} {args}: {error}"
                _no_secret(result)
            # Refused while checking the servers: no lock taken, no debris swept, nothing stored.
            # (check's write probe is deleted again: the snapshot shows what is left.)
            assert pair.repo.snapshot() == before, name
    finally:
        other.destroy()
        second.stop(mode="immediate")


@pytest.mark.file_only  # what check says about a standby does not depend on the backend
def test_check_on_a_standby_switches_on_the_primary_or_says_it_skipped(pair: Pair) -> None:
    with_primary = pair.on_standby("check-with-primary", primary_conninfo=pair.primary_conninfo())
    result = with_primary.ok("check", "--json")
    checks = {c["check"]: c["result"] for c in json.loads(result.stdout)["checks"]}
    assert checks["role"] == "standby (in recovery)"
    assert checks["primary"].endswith("not in recovery")
    segment = checks["WAL archived"].removesuffix(" (switched on the primary)")
    assert segment != checks["WAL archived"], checks
    assert pair.repo.exists(LAYOUT.wal_key(segment))
    _no_secret(result)

    text = with_primary.ok("check")
    assert "switched on the primary" in text.stdout and "check passed" in text.stdout

    without = pair.on_standby("check-without-primary", primary_conninfo=None)
    skipped = without.ok("check")  # a note, not an error
    lines = skipped.stdout.splitlines()
    assert any(line.startswith("role") and "standby" in line for line in lines), skipped.stdout
    archived = next(line for line in lines if line.startswith("WAL archived"))
    assert "not tested" in archived and "postgres.primary_conninfo" in archived, archived
    assert "check passed" in skipped.stdout
    assert "error" not in skipped.stderr


# ---- a failover while the standby backup runs ---------------------------------------------------------
#
# The standby's backup starts on timeline 1; while it streams, the old primary stops, another standby
# is promoted (timeline 2) and the backed-up standby follows it. The backup then ends on timeline 2,
# and its manifest lists two WAL ranges, the newest timeline first.

# pgvault's own CLI, holding the first part's upload until the test creates the release file.
_HOLD_FIRST_PART = """
import sys, time
from pathlib import Path
from pgvault import cli
from pgvault.repo.file import FileStorage

reached, release = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))

def holding(real_put):
    def put(self, key, data, **kwargs):
        if key.endswith("/part-00000.tar.zst"):
            reached.write_text(key)
            while not release.exists():
                time.sleep(0.05)
        return real_put(self, key, data, **kwargs)
    return put

FileStorage.put = holding(FileStorage.put)
cli.main()
"""
PYTHON = str(Path(sys.executable).parent.resolve() / "python")


def _replayed(standby: LocalInstance, upstream: LocalInstance) -> None:
    lsn = Lsn.parse(upstream.psql("SELECT pg_current_wal_insert_lsn()"))
    wait_for(lambda: Lsn.parse(standby.psql("SELECT pg_last_wal_replay_lsn()")) >= lsn,
             f"the standby on port {standby.port} to replay {lsn}")


@pytest.mark.file_only  # the held upload is the file backend's; the timeline logic is the same on S3
def test_standby_backup_across_a_failover_ends_on_the_new_timeline(workdir: Path) -> None:
    old = new_cluster(workdir, settings={"archive_timeout": "1h", "autovacuum": "off"})
    try:
        source = start_standby(old, "source")  # the standby backed up
        promoted = start_standby(old, "promoted")  # the primary after the failover
        old.create_table()
        before = old.commit_batches(2, pause=0.3)
        old.sql("CHECKPOINT")
        _replayed(source, old.pg)
        config = workdir / "source.yaml"
        # One upload at a time: holding the first part's upload then holds the stream too.
        write_policy(config, CLUSTER, source.conninfo(), old.repo,
                     backup={"part_size": "1MiB", "wal_timeout": "2m", "upload_parallel": 1})
        reached, release = workdir / "reached", workdir / "release"
        proc = subprocess.Popen(as_db_user([PYTHON, "-c", _HOLD_FIRST_PART, str(reached), str(release), "--config",
                                            str(config), "-q", "backup", "--json"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                                start_new_session=True)
        try:
            wait_for(reached.exists, "the backup to store its first part", timeout=120, interval=0.05)
            # Failover: the old primary stops, `promoted` becomes the primary on timeline 2, `source` follows.
            old.pg.stop()
            promoted.promote()
            promoted.wait_promoted()
            during = Marks([Cluster(workdir, promoted, old.config, old.repo, _batch=10).commit_batch()])
            set_auto_conf(source.pgdata, {"primary_conninfo": promoted.conninfo()})
            source.psql("SELECT pg_reload_conf()")
            promoted.psql("CHECKPOINT")
            _replayed(source, promoted)
            assert source.psql("SELECT received_tli FROM pg_stat_wal_receiver") == "2"
            # A restartpoint on timeline 2 moves the standby's minimum recovery point, where its backup ends.
            source.psql("CHECKPOINT")
            release.touch()
            # The new primary archives the backup's last segment when it switches WAL (its
            # archive_timeout is an hour too); switch until the backup is done.
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                promoted.psql("SELECT pg_switch_wal()")
                time.sleep(0.5)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            kill_group(proc)
        assert proc.returncode == 0, stderr
        record = json.loads(stdout)
        assert record["from_standby"] is True
        # It started on timeline 1 and ends where the standby stood at its end: on timeline 2, past
        # the switch point (the manifest's first range; its last one ends at the switch point).
        switch = parse_history((promoted.pgdata / "pg_wal" / "00000002.history").read_text())[-1].switch_lsn
        assert (record["start_wal"][:8], record["timeline"], record["stop_wal"][:8]) == ("00000001", 2, "00000002")
        assert Lsn.parse(record["start_lsn"]) < switch < Lsn.parse(record["stop_lsn"]), (record, switch)

        # Restore it to a moment after the failover: the rows of both timelines, exactly.
        new = Cluster(workdir, promoted, config, old.repo, _batch=20)
        try:
            after = new.commit_batches(2, pause=0.4)
            promoted.psql("SELECT pg_switch_wal()")
            last = promoted.psql("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")
            wait_for(lambda: old.repo.exists(LAYOUT.wal_key(last)), f"{last} in the repository")
            restored_json, restored = new.restore_json("--target-time", after[0].between_next.isoformat())
            assert restored_json["backup_id"] == record["id"]
            assert rows_of(restored) == sorted(before.rows_through(1) + during.rows_through(0) + after[0].rows)
        finally:
            new.stop_all()
    finally:
        old.stop_all()
