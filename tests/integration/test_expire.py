"""expire and keep against real PostgreSQL, on both backends: after expiry every kept backup restores,
and point-in-time recovery to a moment inside the window still gives exactly the committed rows.

Backups here are seconds apart, not days: `expire --now` (a hidden flag) sets the clock the plan is
made for, so the PITR window can begin exactly between two backups. The day/week/month buckets cannot
be faked the same way (a backup's stop time is what restore relies on), so the policy keeps 1 of each:
whatever the buckets, that is the newest backup. Bucketing itself is proven in tests/unit/test_retention.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PGVAULT, Cluster, Marks, kill_group, new_cluster, rows_of

from pgvault.pg.instance import as_db_user
from pgvault.pg.wal import is_history
from pgvault.repo.layout import Layout

pytestmark = pytest.mark.integration

LAYOUT = Layout("test")
RETENTION = {"daily": 1, "weekly": 1, "monthly": 1, "min_backups": 1, "pitr_window": "1h"}
WINDOW = timedelta(hours=1)


@pytest.fixture
def retained(workdir: Path, backend: str) -> Iterator[Cluster]:
    """A cluster whose policy keeps the newest backup and a 1 h PITR window."""
    made = new_cluster(workdir, backend=backend, retention=RETENTION, settings={"autovacuum": "off"})
    made.create_table()
    try:
        yield made
    finally:
        made.stop_all()


def backup_record(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.ok("-q", "backup", "--json").stdout)


def wal_names(cluster: Cluster) -> set[str]:
    return {key.rsplit("/", 1)[1].removesuffix(".zst") for key in cluster.repo.keys(LAYOUT.wal_prefix)}


def segment_number(name: str) -> int:
    return int(name[8:16], 16) * 256 + int(name[16:24], 16)  # 16 MiB segments: 256 per log file


def repository_state(cluster: Cluster) -> dict[str, str]:
    """Everything stored but the locks (which any run takes and leaves behind, empty)."""
    return {k: v for k, v in cluster.repo.snapshot().items() if "/locks/" not in k and not k.startswith("test/locks")}


def test_after_expire_kept_backups_restore_and_pitr_inside_the_window_is_exact(retained: Cluster) -> None:
    c = retained
    batches = Marks()
    batches.items += c.commit_batches(1).items  # batch 1
    a = backup_record(c)
    batches.items += c.commit_batches(1).items  # batch 2
    b = backup_record(c)
    batches.items += c.commit_batches(1).items  # batch 3
    cc = backup_record(c)
    time.sleep(1.0)  # the window will begin 0.3 s after C ended: batches 4 on are inside it
    batches.items += c.commit_batches(2).items  # batches 4, 5
    d = backup_record(c)
    batches.items += c.commit_batches(2).items  # batches 6, 7
    c.flush_archive()
    assert c.ok("keep", b["id"]).stdout.strip().startswith(f"backup {b['id']} pinned")
    now = (datetime.fromisoformat(cc["stop_time"]) + WINDOW + timedelta(seconds=0.3)).isoformat()
    assert batches[3].committed_at > datetime.fromisoformat(now) - WINDOW

    # What must go: WAL older than C's start, except B's own consistency range.
    wal_before = wal_names(c)
    b_range = range(segment_number(b["start_wal"]), segment_number(b["stop_wal"]) + 1)
    doomed = {n for n in wal_before if not is_history(n) and segment_number(n) < segment_number(cc["start_wal"])
              and segment_number(n) not in b_range}
    assert any(segment_number(n) in range(segment_number(b["stop_wal"]) + 1, segment_number(cc["start_wal"]))
               for n in doomed), "no WAL between B and C: the test would prove nothing about the gap"

    # --dry-run: the plan, and nothing deleted.
    before = repository_state(c)
    dry = json.loads(c.ok("-q", "expire", "--dry-run", "--json", "--now", now).stdout)
    assert repository_state(c) == before
    assert dry["dry_run"] is True
    reasons = {k["id"]: k["reasons"] for k in dry["kept"]}
    assert reasons[b["id"]] == ["pinned"]
    assert reasons[cc["id"]] == ["pitr"]
    assert reasons[d["id"]][0] == "min_backups"
    assert [r.split()[0] for r in reasons[d["id"]][1:]] == ["daily", "weekly", "monthly"]
    assert [x["id"] for x in dry["deleted"]] == [a["id"]]
    assert dry["wal_deleted_files"] == len(doomed)
    assert dry["freed_bytes"] > a["stored_size"]

    result = json.loads(c.ok("-q", "expire", "--json", "--now", now).stdout)
    assert result["dry_run"] is False
    assert {k: v for k, v in result.items() if k != "dry_run"} == {k: v for k, v in dry.items() if k != "dry_run"}
    assert c.repo.keys(LAYOUT.backup_prefix(a["id"])) == []
    assert wal_names(c) == wal_before - doomed
    listed = json.loads(c.ok("-q", "list", "--json").stdout)["backups"]
    assert [x["id"] for x in listed] == [b["id"], cc["id"], d["id"]]
    # Run again: nothing more to do.
    again = json.loads(c.ok("-q", "expire", "--json", "--now", now).stdout)
    assert again["deleted"] == [] and again["wal_deleted_files"] == 0

    # Every kept backup still restores, to exactly what was committed before it.
    for record, through in ((b, 1), (cc, 2), (d, 4)):
        restored_as, copy = c.restore_json("--backup", record["id"], "--target", "immediate")
        assert restored_as["backup_id"] == record["id"]
        assert rows_of(copy) == batches.rows_through(through), f"backup {record['id']}"
        copy.destroy()
    # Moments inside the window: between batches 4 and 5 (from C), and 6 and 7 (from D).
    for index, source in ((3, cc), (5, d)):
        restored_as, copy = c.restore_json("--target-time", batches[index].between_next.isoformat())
        assert restored_as["backup_id"] == source["id"]
        assert rows_of(copy) == batches.rows_through(index)
        copy.destroy()
    # Moments whose WAL expired are refused before anything is written (guarantee 6): after B ended
    # and before batch 3 (B's WAL ends at its consistency point now), and before B (A is gone).
    b_end = datetime.fromisoformat(b["stop_time"])
    in_gap = b_end + (batches[2].committed_at - b_end) / 2
    for target, says in ((in_gap, "after the last archived WAL"),
                         (batches[0].between_next, "before the end of the earliest usable backup")):
        refused = c.restore("--dry-run", "--target-time", target.isoformat())
        assert refused.returncode == 1, refused.out
        assert says in refused.stderr


def test_expire_waits_for_no_backup_and_removes_the_debris_of_a_killed_one(retained: Cluster) -> None:
    c = retained
    kept = c.backup()
    original = c.sql("SHOW archive_command")
    c.sql("ALTER SYSTEM SET archive_command = 'false'")
    c.sql("SELECT pg_reload_conf()")
    proc = subprocess.Popen(as_db_user([PGVAULT, "--config", str(c.config), "-q", "backup"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            start_new_session=True)
    try:
        # The backup streams its parts, then waits (holding the lock) for WAL that never comes.
        deadline = time.monotonic() + 120
        # By id, not substring: a backup started in the same second as `kept` is `<kept>-2`.
        while not ([k for k in c.repo.keys(LAYOUT.backups_prefix)
                    if k[len(LAYOUT.backups_prefix):].split("/")[0] != kept and "/part-" in k]
                   and c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgvault-backup-%'")
                   == "0"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup did not get to waiting for its WAL"
            time.sleep(0.2)
        before = repository_state(c)
        refused = c.pgvault("-q", "expire")
        assert refused.returncode == 1, refused.out
        assert refused.stderr.startswith("error: another backup of cluster 'test' is running"), refused.stderr
        assert repository_state(c) == before
    finally:
        kill_group(proc)
        c.sql(f"ALTER SYSTEM SET archive_command = '{original}'")
        c.sql("SELECT pg_reload_conf()")
    debris = {k.split("/")[2] for k in c.repo.keys(LAYOUT.backups_prefix)} - {kept}
    assert len(debris) == 1
    dry = json.loads(c.ok("-q", "expire", "--dry-run", "--json").stdout)
    assert dry["debris"] == sorted(debris)
    result = c.ok("-q", "expire")
    assert f"deleted      debris of incomplete backup {debris.pop()}" in result.stdout
    assert {k.split("/")[2] for k in c.repo.keys(LAYOUT.backups_prefix)} == {kept}
    assert c.repo.debris(LAYOUT.backups_prefix) == []


def test_keep_pins_and_releases_and_refuses_unknown_ids(retained: Cluster) -> None:
    c = retained
    backup_id = c.backup()
    pin = LAYOUT.pin_key(backup_id)
    assert c.ok("keep", backup_id).stdout == (f"backup {backup_id} pinned: expire keeps it until "
                                              f"pgvault keep {backup_id} --release\n")
    assert c.repo.exists(pin)
    # list and info show the pin.
    rows = {b["id"]: b["pinned"] for b in json.loads(c.ok("-q", "list", "--json").stdout)["backups"]}
    assert rows[backup_id] is True and list(rows.values()).count(True) == 1, rows
    assert json.loads(c.ok("-q", "info", backup_id, "--json").stdout)["pinned"] is True
    assert "pinned           yes" in c.ok("-q", "info", backup_id).stdout
    assert json.loads(c.ok("keep", backup_id, "--json").stdout) == {"backup_id": backup_id, "pinned": True,
                                                                   "changed": False}
    before = repository_state(c)
    unknown = c.pgvault("keep", "20200101T000000Z")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == ("error: no backup '20200101T000000Z' in this repository\n"
                              "hint: pgvault list shows backup ids\n")
    bad = c.pgvault("keep", "../../etc")
    assert bad.returncode == 2 and bad.stderr.startswith("error: '../../etc' is not a backup id"), bad.out
    no_zone = c.pgvault("expire", "--now", "2026-11-20 14:00:00")
    assert no_zone.returncode == 2 and "has no time zone" in no_zone.stderr.splitlines()[0], no_zone.out
    assert repository_state(c) == before
    assert c.ok("keep", backup_id, "--release").stdout == f"backup {backup_id} released: expire may delete it\n"
    assert not c.repo.exists(pin)
    assert json.loads(c.ok("-q", "info", backup_id, "--json").stdout)["pinned"] is False
    assert c.ok("keep", backup_id, "--release").stdout == f"backup {backup_id} was not pinned\n"
