"""Point-in-time recovery against real PostgreSQL: restored rows must equal exactly what was committed."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import Cluster, Marks, make_workdir, new_cluster, rows_of, write_policy
from repos import flip_byte

from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, chown_to_db_user
from pgvault.pg.wal import Lsn

pytestmark = [pytest.mark.integration]

Rows = list[tuple[int, int]]


def test_pitr_by_time_restores_exactly_the_committed_rows(cluster: Cluster) -> None:
    cluster.backup()
    marks = cluster.commit_batches(6)
    cluster.flush_archive()
    restored = cluster.restore_into("--target-time", marks[3].between_next.isoformat())
    assert rows_of(restored) == marks.rows_through(3)


# ---- one shared history, many targets ---------------------------------------------------------------
#
#   batches 1-2 | backup A | batches 3-4 | restore point 'rp_mid' | batches 5-6 | backup B | batches 7-9 | flush
#
# marks[i] are the batches after backup A: marks[0] is batch 3, ..., marks[6] is batch 9.
# Restored copies never archive (--archive-mode off), so the repository stays as the history left it.

RESTORE_POINT = "rp_mid"
RP_AFTER = 1  # the restore point lies between marks[1] and marks[2]
LAST_BEFORE_B = 3  # marks[3] is the last batch committed before backup B


@dataclass
class History:
    cluster: Cluster
    before_a: Marks  # committed before backup A
    marks: Marks  # committed after backup A
    a: dict[str, Any]  # backup A's record (backup --json)
    b: dict[str, Any]

    def rows_through(self, index: int) -> Rows:
        """Rows committed up to and including marks[index] (-1: only those before backup A)."""
        base = self.before_a.rows_through(len(self.before_a) - 1)
        return sorted(base) if index < 0 else self.marks.rows_through(index, base)

    def at(self, index: int) -> str:
        """A target time between marks[index]'s commit and the next batch's."""
        return self.marks[index].between_next.isoformat()


def _backup_record(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.ok("-q", "backup", "--json").stdout)


@pytest.fixture(scope="module")
def shared_history(backend: str) -> Iterator[History]:
    workdir = make_workdir()
    # No autovacuum: its commits would move the end of the recoverable window past our last batch.
    cluster = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"})
    try:
        cluster.create_table()
        before_a = cluster.commit_batches(2, pause=0.3)
        a = _backup_record(cluster)
        first = cluster.commit_batches(2, pause=0.3)
        cluster.sql(f"SELECT pg_create_restore_point('{RESTORE_POINT}')")
        second = cluster.commit_batches(2, pause=0.3)
        b = _backup_record(cluster)
        third = cluster.commit_batches(3, pause=0.3)
        cluster.flush_archive()
        yield History(cluster, before_a, Marks(first.items + second.items + third.items), a, b)
    finally:
        cluster.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def history(shared_history: History) -> Iterator[History]:
    """The shared history; the copies a test restores are destroyed after it."""
    restored_before = len(shared_history.cluster.restored)
    yield shared_history
    for instance in shared_history.cluster.restored[restored_before:]:
        with contextlib.suppress(Exception):
            instance.destroy()


@pytest.mark.parametrize(("index", "backup"), [(2, "a"), (5, "b")], ids=["between-backups", "after-second"])
def test_time_target_uses_the_newest_backup_before_it(history: History, index: int, backup: str) -> None:
    result, restored = history.cluster.restore_json("--target-time", history.at(index))
    expected_backup = history.a if backup == "a" else history.b
    assert result["backup_id"] == expected_backup["id"]
    assert rows_of(restored) == history.rows_through(index)


def test_lsn_target_stops_right_after_that_position(history: History) -> None:
    result, restored = history.cluster.restore_json("--target-lsn", history.marks[2].lsn_after)
    assert result["backup_id"] == history.a["id"]
    assert rows_of(restored) == history.rows_through(2)


@pytest.mark.parametrize(("index", "backup"), [(2, "a"), (5, "b")], ids=["between-backups", "after-second"])
def test_xid_target_includes_that_transaction(history: History, index: int, backup: str) -> None:
    result, restored = history.cluster.restore_json("--target-xid", str(history.marks[index].xid))
    assert result["backup_id"] == (history.a if backup == "a" else history.b)["id"]
    assert rows_of(restored) == history.rows_through(index)


def test_exclusive_xid_target_excludes_that_transaction(history: History) -> None:
    result, restored = history.cluster.restore_json("--target-xid", str(history.marks[5].xid),
                                                    "--target-exclusive")
    assert result["backup_id"] == history.b["id"]
    assert rows_of(restored) == history.rows_through(4)


def test_epoch_qualified_xid_finds_the_same_transaction(history: History) -> None:
    # txid_current() carries the epoch above bit 32; PostgreSQL's recovery_target_xid keeps the low 32
    # bits, and pgvault must locate the transaction the same way.
    epoch_qualified = (1 << 32) + history.marks[2].xid
    result, restored = history.cluster.restore_json("--target-xid", str(epoch_qualified))
    assert result["backup_id"] == history.a["id"]
    assert rows_of(restored) == history.rows_through(2)


def test_restore_point_target(history: History) -> None:
    result, restored = history.cluster.restore_json("--target-name", RESTORE_POINT)
    assert result["backup_id"] == history.a["id"]
    assert rows_of(restored) == history.rows_through(RP_AFTER)


def test_immediate_target_holds_only_what_the_newest_backup_holds(history: History) -> None:
    result, restored = history.cluster.restore_json("--target", "immediate")
    assert result["backup_id"] == history.b["id"]
    assert rows_of(restored) == history.rows_through(LAST_BEFORE_B)


def test_immediate_target_of_a_chosen_backup_ignores_later_wal(history: History) -> None:
    result, restored = history.cluster.restore_json("--backup", history.a["id"], "--target", "immediate")
    assert result["backup_id"] == history.a["id"]
    assert rows_of(restored) == history.rows_through(-1)


def test_no_target_recovers_everything_archived(history: History) -> None:
    result, restored = history.cluster.restore_json()
    assert result["backup_id"] == history.b["id"]
    assert rows_of(restored) == history.rows_through(len(history.marks) - 1)


def _wait_paused(instance: LocalInstance, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            state = instance.query("SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state()")[0]
            if state == (True, "paused"):
                return
        time.sleep(0.1)
    raise AssertionError(f"recovery did not pause within {timeout}s (last state {state}):\n{instance.log_tail()}")


def test_target_action_pause_stays_in_recovery_with_exactly_the_target_rows(history: History) -> None:
    index = 4
    _result, restored = history.cluster.restore_json("--target-time", history.at(index), "--target-action", "pause",
                                                     wait_promoted=False)
    _wait_paused(restored)
    assert restored.query("SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state()") == [(True, "paused")]
    assert rows_of(restored) == history.rows_through(index)
    log = restored.log_path.read_text()
    assert f"recovery stopping before commit of transaction {history.marks[index + 1].xid}," in log


def test_target_action_shutdown_stops_the_server_at_the_target(history: History) -> None:
    index = 5
    _result, restored = history.cluster.restore_json("--target-time", history.at(index), "--target-action",
                                                     "shutdown", start=False)
    restored.start(wait=False)
    restored.wait_stopped(timeout=60)
    assert not restored.is_running()
    log = restored.log_path.read_text()
    assert f"recovery stopping before commit of transaction {history.marks[index + 1].xid}," in log
    assert "shutdown at recovery target" in log
    # The stopped data directory is usable: recover to the same target again, this time promoting.
    set_auto_conf(restored.pgdata, {"recovery_target_action": "promote"})
    restored.start()
    restored.wait_promoted()
    assert rows_of(restored) == history.rows_through(index)


@pytest.mark.parametrize("mode", ["--delta", "--force"])
def test_restore_over_a_previous_restore(history: History, mode: str) -> None:
    cluster = history.cluster
    first = cluster.restore_into("--target-time", history.at(5))
    assert rows_of(first) == history.rows_through(5)
    # The old copy diverges (new timeline, rows of its own) before it is stopped and restored over.
    first.query("INSERT INTO t SELECT 999, g FROM generate_series(1, 5) g")
    first.psql("CHECKPOINT")
    first.stop()

    refused = cluster.restore("--target-time", history.at(2), pgdata=first.pgdata)
    assert refused.returncode == 1, refused.out
    assert "is not empty" in refused.stderr

    result, again = cluster.restore_json("--target-time", history.at(2), mode, pgdata=first.pgdata)
    assert result["backup_id"] == history.a["id"]
    if mode == "--delta":
        assert result["files_unchanged"] > 0
    else:
        assert result["files_unchanged"] == 0
    assert rows_of(again) == history.rows_through(2)


def _stamp(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_info_and_list_report_the_recoverable_window(history: History) -> None:
    info = json.loads(history.cluster.ok("-q", "info", "--json").stdout)
    listed = json.loads(history.cluster.ok("-q", "list", "--json").stdout)

    ids = [history.a["id"], history.b["id"]]
    for report in (info, listed):
        assert [b["id"] for b in report["backups"]] == ids
        stops = [Lsn.parse(b["stop_lsn"]) for b in report["backups"]]
        assert stops == sorted(stops) and stops[0] < stops[1]
        assert [w["timeline"] for w in report["windows"]] == [1]

    window = info["windows"][0]
    assert window["backups"] == ids
    assert _stamp(window["earliest_time"]) == _stamp(history.a["stop_time"])
    assert window["earliest_lsn"] == history.a["stop_lsn"]
    latest = _stamp(window["latest_time"])
    last, previous = history.marks[-1], history.marks[-2]
    # The server stamps the commit just before the client sees COMMIT return.
    assert previous.committed_at < latest <= last.committed_at
    assert last.committed_at - latest < timedelta(seconds=1)
    assert listed["windows"] == info["windows"]


# ---- writes running during the backup -----------------------------------------------------------------

@dataclass
class Commit:
    batch: int
    started_at: datetime  # client clock, before the transaction began
    committed_at: datetime  # client clock, after COMMIT returned
    lsn_after: Lsn


class Writer(threading.Thread):
    """Commits small batches into t, one after another, until stopped; records every commit."""

    def __init__(self, instance: LocalInstance, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.instance = instance
        self.pause = pause
        self.commits: list[Commit] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with self.instance.connect() as conn:
                batch = 0
                while not self._stop_event.is_set():
                    batch += 1
                    started_at = datetime.now(UTC)
                    with conn.transaction():
                        conn.execute("INSERT INTO t SELECT %s, g FROM generate_series(1, 3) g", (batch,))
                    committed_at = datetime.now(UTC)
                    lsn = Lsn.parse(str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]))
                    self.commits.append(Commit(batch, started_at, committed_at, lsn))
                    self._stop_event.wait(self.pause)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[Commit]:
        self._stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive()
        assert self.error is None, f"writer failed: {self.error!r}"
        return self.commits


def test_writes_during_the_backup_are_recovered_exactly(cluster: Cluster) -> None:
    # ~100 MB of filler so the backup runs for a couple of seconds while the writer commits.
    cluster.sql("CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad "
                "FROM generate_series(1, 800000) g")
    writer = Writer(cluster.pg)
    writer.start()
    try:
        time.sleep(0.3)
        record = _backup_record(cluster)
        time.sleep(0.8)
    finally:
        commits = writer.finish()
    cluster.flush_archive()

    start_lsn, stop_lsn = Lsn.parse(record["start_lsn"]), Lsn.parse(record["stop_lsn"])
    during = [c for c in commits if start_lsn < c.lsn_after <= stop_lsn]
    assert len(during) >= 10, f"only {len(during)} commits overlapped the backup ({record['duration_s']} s)"

    stop_time = _stamp(record["stop_time"])
    index = next(i for i, c in enumerate(commits) if c.committed_at > stop_time)
    assert index + 3 < len(commits), "too few commits after the backup"
    gap_start, gap_end = commits[index].committed_at, commits[index + 1].started_at
    assert gap_end > gap_start
    target = gap_start + (gap_end - gap_start) / 2

    result, restored = cluster.restore_json("--target-time", target.isoformat())
    assert result["backup_id"] == record["id"]
    expected = sorted((c.batch, n) for c in commits[: index + 1] for n in range(1, 4))
    assert rows_of(restored) == expected
    assert restored.query("SELECT count(*) FROM filler") == [(800000,)]


# ---- tablespaces ------------------------------------------------------------------------------------

def test_a_cluster_with_a_tablespace_restores_with_it_to_a_mapped_directory(cluster: Cluster) -> None:
    location = cluster.db_user_dir("ts-original")
    cluster.sql(f"CREATE TABLESPACE ts_extra LOCATION '{location}'")
    cluster.sql("CREATE TABLE t_ts (batch int NOT NULL, n int NOT NULL) TABLESPACE ts_extra")
    before = cluster.commit_batches(2, pause=0.3, table="t_ts")
    backup = json.loads(cluster.ok("-q", "backup", "--json").stdout)
    assert [t["name"] for t in backup["tablespaces"]] == ["ts_extra"]
    assert any(p["tablespace"] == backup["tablespaces"][0]["oid"] for p in backup["parts"])
    marks = cluster.commit_batches(3, pause=0.3, table="t_ts")
    cluster.flush_archive()

    # The original location is in use by the running cluster: refused, and nothing written.
    target = cluster.workdir / "ts-refused-pgdata"
    refused = cluster.restore("--target-time", marks[1].between_next.isoformat(), pgdata=target)
    assert refused.returncode == 1, refused.out
    assert "ts_extra" in refused.stderr and "--tablespace-map" in refused.stderr
    assert not target.exists()

    mapped = cluster.workdir / "ts-restored"
    result, restored = cluster.restore_json("--target-time", marks[1].between_next.isoformat(),
                                            "--tablespace-map", f"ts_extra={mapped}")
    assert result["tablespaces"] == {backup["tablespaces"][0]["oid"]: str(mapped)}
    expected = sorted(before.rows_through(1) + marks.rows_through(1))
    assert rows_of(restored, "t_ts") == expected
    # The table really lives in the mapped directory, not in the original one.
    assert restored.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts_extra'") \
        == str(mapped)
    assert any(mapped.rglob("PG_15_*"))


def test_tablespace_map_must_name_a_tablespace_of_the_backup(cluster: Cluster) -> None:
    cluster.backup()
    cluster.commit_batches(1)
    cluster.flush_archive()
    target = cluster.workdir / "no-such-ts"
    result = cluster.restore("--tablespace-map", f"nope={cluster.workdir / 'x'}", pgdata=target)
    assert result.returncode == 2, result.out
    assert "--tablespace-map nope" in result.stderr and "no such tablespace" in result.stderr
    assert not target.exists()


# ---- timelines ---------------------------------------------------------------------------------------

def test_restore_follows_a_new_timeline_archived_by_a_promoted_copy(cluster: Cluster) -> None:
    cluster.backup()
    marks = cluster.commit_batches(3, pause=0.3)
    cluster.flush_archive()

    # A copy recovered to batch 2 that keeps archiving into the same repository: it promotes onto
    # timeline 2, and the original goes on writing on timeline 1.
    copy = cluster.restore_into("--target-time", marks[1].between_next.isoformat(), archive_mode="preserve")
    assert copy.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").startswith("00000002")
    copy_config = cluster.workdir / "copy.yaml"
    write_policy(copy_config, "test", copy.conninfo(), cluster.repo)
    on_copy = Cluster(workdir=cluster.workdir, pg=copy, config=copy_config, repo=cluster.repo)
    on_copy._batch = 100
    copy_marks = on_copy.commit_batches(2, pause=0.2)
    on_copy.flush_archive()
    copy_rows = marks.rows_through(1) + [r for m in copy_marks.items for r in m.rows]
    assert rows_of(copy) == sorted(copy_rows)

    original_more = cluster.commit_batches(1, pause=0.2)
    cluster.flush_archive()
    assert cluster.repo.exists("test/wal/00000002.history"), "timeline 2's history was not archived"

    result, restored = cluster.restore_json("--target-timeline", "2")
    assert result["timeline"] == 2
    assert rows_of(restored) == sorted(copy_rows)

    result, restored = cluster.restore_json("--target-timeline", "1")
    assert result["timeline"] == 1
    assert rows_of(restored) == marks.rows_through(2, original_more.rows_through(0))

    missing = cluster.next_restore_dir()
    refused = cluster.restore("--target-timeline", "7", pgdata=missing)
    assert refused.returncode == 1, refused.out
    assert "timeline 7" in refused.stderr
    assert not missing.exists() or not any(missing.iterdir())


def test_in_place_restore_with_force_brings_back_the_tablespace_at_its_original_location(cluster: Cluster) -> None:
    location = cluster.db_user_dir("ts-in-place")
    cluster.sql(f"CREATE TABLESPACE ts_home LOCATION '{location}'")
    cluster.sql("CREATE TABLE t_home (batch int NOT NULL, n int NOT NULL) TABLESPACE ts_home")
    cluster.backup()
    marks = cluster.commit_batches(3, pause=0.3, table="t_home")
    cluster.flush_archive()
    # The disaster: a bad batch 3, then the server is stopped and restored in place.
    cluster.pg.stop()
    result = cluster.restore("--force", "--target-time", marks[1].between_next.isoformat(), pgdata=cluster.pg.pgdata)
    assert result.returncode == 0, result.out
    _oid, mapped_to = (cluster.pg.pgdata / "tablespace_map").read_text().split()
    assert mapped_to == str(location)
    cluster.pg.start()
    cluster.pg.wait_promoted()
    assert rows_of(cluster.pg, "t_home") == marks.rows_through(1)
    assert cluster.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts_home'") \
        == str(location)


def test_force_into_a_copy_never_wipes_the_live_clusters_tablespace(cluster: Cluster) -> None:
    location = cluster.db_user_dir("ts-live")
    cluster.sql(f"CREATE TABLESPACE ts_live LOCATION '{location}'")
    cluster.sql("CREATE TABLE t_live (batch int NOT NULL, n int NOT NULL) TABLESPACE ts_live")
    cluster.backup()
    cluster.commit_batches(1, table="t_live")
    cluster.flush_archive()
    before = sorted(str(p) for p in location.rglob("*"))
    copy = cluster.workdir / "copy-pgdata"
    copy.mkdir()
    chown_to_db_user(copy)
    for flag in ("--force", "--delta"):
        result = cluster.restore(flag, pgdata=copy)
        assert result.returncode == 1, result.out
        assert "ts_live" in result.stderr and "--tablespace-map" in result.stderr
    assert sorted(str(p) for p in location.rglob("*")) == before
    assert list(copy.iterdir()) == []
    assert rows_of(cluster.pg, "t_live") == [(1, n) for n in range(1, 6)]


def test_dry_run_checks_everything_reports_the_plan_and_writes_nothing(cluster: Cluster) -> None:
    first = cluster.backup()
    marks = cluster.commit_batches(2)
    cluster.flush_archive()
    target = cluster.workdir / "dry-run-target"
    result = cluster.restore("--dry-run", "--json", "--target-time", marks[0].between_next.isoformat(), pgdata=target)
    assert result.returncode == 0, result.out
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["backup_id"] == first and plan["files_written"] == 0
    assert plan["settings"]["recovery_target_time"] == marks[0].between_next.isoformat(sep=" ")
    assert not target.exists()

    # The same checks as a real restore: a damaged part is found without writing anything.
    part = cluster.repo.keys(f"test/backups/{first}/part-")[0]
    flip_byte(cluster.repo, part)
    damaged = cluster.restore("--dry-run", pgdata=target)
    assert damaged.returncode == 1 and part.rsplit("/", 1)[-1] in damaged.stderr, damaged.out
    assert not target.exists()
