"""window.py: timeline ancestry, WAL continuity and the choice of backup, on synthetic catalogs."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault.catalog import BackupRecord, StoredObject
from pgvault.errors import TargetUnreachable
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment
from pgvault.window import (
    BackupReach,
    TimelineSpan,
    ancestry,
    backup_on_path,
    by_id,
    choose_for_lsn,
    choose_for_time,
    reachable_backups,
    wal_run,
)

SEG = 16 * 1024 * 1024
INFINITY = Lsn(2**64 - 1)
T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def backup(n: int, *, timeline: int = 1, start: int | None = None, stop: int | None = None,
           stop_time: datetime | None = None) -> BackupRecord:
    """Backup number n: by default starts in segment 2n and is consistent in segment 2n+1."""
    start_lsn = Lsn(start if start is not None else 2 * n * SEG + 0x28)
    stop_lsn = Lsn(stop if stop is not None else (2 * n + 1) * SEG + 0x100)
    stop_time = stop_time or T0 + timedelta(hours=n)
    return BackupRecord(
        id=f"B{n:04d}", cluster="test", system_id="7300000000000000001", pg_version=150000, timeline=timeline,
        start_lsn=str(start_lsn), stop_lsn=str(stop_lsn), checkpoint_lsn=str(start_lsn),
        start_time=stop_time - timedelta(minutes=1), stop_time=stop_time,
        start_wal=WalSegment.containing(timeline, start_lsn, SEG).name,
        stop_wal=WalSegment.containing(timeline, stop_lsn, SEG).name,
        next_xid=1000 + n, label=f"pgvault B{n:04d}", parts=[],
        manifest=StoredObject(key=f"test/backups/B{n:04d}/backup_manifest.zst", size=1, sha256="0" * 64),
        raw_size=1, stored_size=1, duration_s=1.0, compression={"type": "zstd", "level": 3},
        pgvault_version="0.1.0",
    )


def reach_of(*records: BackupRecord) -> list[BackupReach]:
    return [BackupReach(r, [WalSegment.parse(r.start_wal, SEG), WalSegment.parse(r.stop_wal, SEG)])
            for r in records]


# ---- ancestry -------------------------------------------------------------------------------------

def test_ancestry_of_the_first_timeline_is_everything() -> None:
    assert ancestry(1, []) == [TimelineSpan(1, Lsn(0), INFINITY)]


def test_ancestry_follows_the_history_file() -> None:
    # 00000003.history: timeline 1 until 0/3000158, then 2 until 0/5000028, then 3.
    history = [TimelineSwitch(1, Lsn(0x3000158), "no recovery target specified"),
               TimelineSwitch(2, Lsn(0x5000028), "before 2026-11-20 14:30:00+00")]
    assert ancestry(3, history) == [
        TimelineSpan(1, Lsn(0), Lsn(0x3000158)),
        TimelineSpan(2, Lsn(0x3000158), Lsn(0x5000028)),
        TimelineSpan(3, Lsn(0x5000028), INFINITY),
    ]


def test_ancestry_of_a_branch_that_skipped_a_timeline() -> None:
    # Timeline 4 branched from timeline 2 (3 was another branch, not an ancestor).
    history = [TimelineSwitch(1, Lsn(0x3000000), ""), TimelineSwitch(2, Lsn(0x6000000), "")]
    spans = ancestry(4, history)
    assert [s.timeline for s in spans] == [1, 2, 4]
    assert all(a.end == b.begin for a, b in itertools.pairwise(spans))


def test_backup_on_path() -> None:
    spans = ancestry(2, [TimelineSwitch(1, Lsn(5 * SEG), "")])
    assert backup_on_path(backup(1), spans)  # timeline 1, consistent at 0/3000100, before the switch
    assert not backup_on_path(backup(3), spans)  # timeline 1, consistent after the switch: another future
    assert backup_on_path(backup(3, timeline=2), spans)
    assert not backup_on_path(backup(1, timeline=3), spans)
    assert backup_on_path(backup(2, stop=5 * SEG), spans)  # exactly at the switch point


# ---- choosing a backup ----------------------------------------------------------------------------

@st.composite
def sorted_backups(draw: st.DrawFn) -> list[BackupRecord]:
    """1..12 backups, consistent at strictly increasing times and LSNs (the catalog's order)."""
    gaps = draw(st.lists(st.integers(min_value=1, max_value=10 * 86400), min_size=1, max_size=12))
    lsn_gaps = draw(st.lists(st.integers(min_value=1, max_value=50 * SEG), min_size=len(gaps),
                             max_size=len(gaps)))
    records = []
    when, lsn = T0, SEG
    for n, (gap, lsn_gap) in enumerate(zip(gaps, lsn_gaps, strict=True)):
        when += timedelta(seconds=gap)
        lsn += lsn_gap
        records.append(backup(n, start=lsn - 1, stop=lsn, stop_time=when))
    return records


@given(sorted_backups(), st.integers(min_value=-86400, max_value=130 * 86400))
def test_choose_for_time_picks_the_newest_backup_consistent_by_then(records: list[BackupRecord],
                                                                     offset: int) -> None:
    reach = reach_of(*records)
    target = T0 + timedelta(seconds=offset)
    eligible = [r for r in records if r.stop_time <= target]
    if not eligible:
        with pytest.raises(TargetUnreachable) as caught:
            choose_for_time(reach, target)
        assert records[0].id in caught.value.message
        assert "before the end of the earliest usable backup" in caught.value.message
        return
    chosen = choose_for_time(reach, target).backup
    assert chosen == eligible[-1]
    assert chosen.stop_time <= target
    assert all(r.stop_time > target for r in records if r.stop_time > chosen.stop_time)


@given(sorted_backups(), st.integers(min_value=0, max_value=700 * SEG))
def test_choose_for_lsn_picks_the_newest_backup_consistent_by_then(records: list[BackupRecord],
                                                                    value: int) -> None:
    reach = reach_of(*records)
    target = Lsn(value)
    eligible = [r for r in records if r.stop <= target]
    if not eligible:
        with pytest.raises(TargetUnreachable, match="before the end of the earliest usable backup"):
            choose_for_lsn(reach, target)
        return
    assert choose_for_lsn(reach, target).backup == eligible[-1]


def test_a_target_exactly_at_a_backups_end_uses_that_backup() -> None:
    records = [backup(1), backup(2), backup(3)]
    reach = reach_of(*records)
    assert choose_for_time(reach, records[1].stop_time).backup.id == "B0002"
    assert choose_for_lsn(reach, records[1].stop).backup.id == "B0002"
    assert choose_for_lsn(reach, Lsn(records[1].stop.value - 1)).backup.id == "B0001"


def test_before_the_earliest_backup_says_what_and_how() -> None:
    reach = reach_of(backup(1), backup(2))
    with pytest.raises(TargetUnreachable) as caught:
        choose_for_time(reach, T0)
    error = caught.value
    assert error.exit_code == 1
    assert "target time 2026-11-20 02:00:00+00:00 is before the end of the earliest usable backup B0001" \
        in error.message
    assert "LSN 0/3000100" in error.message
    assert error.hint is not None and "choose a later target" in error.hint
    with pytest.raises(TargetUnreachable, match="target LSN 0/1 is before"):
        choose_for_lsn(reach, Lsn(1))


def test_no_backup_at_all() -> None:
    with pytest.raises(TargetUnreachable, match="holds no restorable backup") as caught:
        choose_for_time([], T0)
    assert caught.value.hint == "take one with pgvault backup"
    with pytest.raises(TargetUnreachable, match="holds no restorable backup"):
        choose_for_lsn([], Lsn(0))


def test_by_id() -> None:
    records = [backup(1), backup(2)]
    reach = reach_of(records[0])
    assert by_id(reach, records, "B0001").backup == records[0]
    with pytest.raises(TargetUnreachable, match="B0002 cannot reach this target timeline"):
        by_id(reach, records, "B0002")
    with pytest.raises(TargetUnreachable, match="no backup B0009 in this repository"):
        by_id(reach, records, "B0009")


# ---- WAL continuity -------------------------------------------------------------------------------

def seg(timeline: int, number: int) -> WalSegment:
    return WalSegment(timeline, number, SEG)


def test_wal_run_stops_at_the_first_gap() -> None:
    spans = ancestry(1, [])
    segments = {1: {2, 3, 4, 6, 7}}
    assert wal_run(seg(1, 2), spans, segments, SEG) == [seg(1, 2), seg(1, 3), seg(1, 4)]
    assert wal_run(seg(1, 6), spans, segments, SEG) == [seg(1, 6), seg(1, 7)]
    assert wal_run(seg(1, 5), spans, segments, SEG) == []
    assert wal_run(seg(1, 0), spans, {}, SEG) == []


@given(st.sets(st.integers(min_value=0, max_value=40)), st.integers(min_value=0, max_value=40))
def test_wal_run_is_the_longest_unbroken_run(present: set[int], start: int) -> None:
    run = wal_run(seg(1, start), ancestry(1, []), {1: present}, SEG)
    expected = []
    number = start
    while number in present:
        expected.append(seg(1, number))
        number += 1
    assert run == expected


def test_wal_run_crosses_a_timeline_switch_like_recovery() -> None:
    # Timeline 2 began in the middle of segment 5: recovery reads 1/3, 1/4, then 2/5 onwards.
    spans = ancestry(2, [TimelineSwitch(1, Lsn(5 * SEG + 0x100), "")])
    segments = {1: {3, 4, 5, 6}, 2: {5, 6, 7}}
    assert wal_run(seg(1, 3), spans, segments, SEG) == [seg(1, 3), seg(1, 4), seg(2, 5), seg(2, 6), seg(2, 7)]
    # Timeline 1's segment 6 lies after the switch: not part of timeline 2's history.
    assert wal_run(seg(1, 3), spans, {1: {3, 4, 5, 6}, 2: {5}}, SEG) == [seg(1, 3), seg(1, 4), seg(2, 5)]
    # Without timeline 2's copy of the switch segment recovery reads timeline 1's, then finds no 2/6.
    assert wal_run(seg(1, 3), spans, {1: {3, 4, 5, 6}, 2: {7}}, SEG) == [seg(1, 3), seg(1, 4), seg(1, 5)]


# ---- reachable backups ----------------------------------------------------------------------------

def test_reachable_backups_drops_backups_whose_wal_is_missing() -> None:
    b1, b2, b3, b4 = backup(1), backup(2), backup(3), backup(4)  # segments 2-3, 4-5, 6-7, 8-9
    segments = {1: {2, 3, 4, 6, 7, 8, 9, 10}}
    reach = reachable_backups([b1, b2, b3, b4], ancestry(1, []), segments, SEG)
    assert [r.backup.id for r in reach] == ["B0001", "B0003", "B0004"]  # B0002 lacks segment 5
    by = {r.backup.id: r for r in reach}
    assert by["B0001"].wal == [seg(1, 2), seg(1, 3), seg(1, 4)]
    assert by["B0001"].wal_end == seg(1, 4)
    assert by["B0003"].wal_end == seg(1, 10)


def test_reachable_backups_drops_a_backup_without_its_start_segment() -> None:
    reach = reachable_backups([backup(1)], ancestry(1, []), {1: {3, 4}}, SEG)
    assert reach == []


def test_reachable_backups_drops_backups_off_the_timeline_path() -> None:
    spans = ancestry(2, [TimelineSwitch(1, Lsn(5 * SEG), "")])
    on_1, after_switch_on_1, on_2 = backup(1), backup(3), backup(3, timeline=2)
    segments = {1: set(range(0, 8)), 2: set(range(5, 10))}
    reach = reachable_backups([on_1, after_switch_on_1, on_2], spans, segments, SEG)
    assert [(r.backup.id, r.backup.timeline) for r in reach] == [("B0001", 1), ("B0003", 2)]
    assert reach[0].wal[-1] == seg(2, 9)


@given(st.sets(st.integers(min_value=0, max_value=30)), st.lists(st.integers(min_value=0, max_value=14),
                                                                  unique=True, max_size=6))
def test_reachable_backups_keeps_exactly_those_with_wal_through_their_end(present: set[int],
                                                                           numbers: list[int]) -> None:
    records = [backup(n) for n in sorted(numbers)]
    reach = reachable_backups(records, ancestry(1, []), {1: present}, SEG)
    kept = [r.backup for r in reach]
    assert kept == [r for r in records if {2 * int(r.id[1:]), 2 * int(r.id[1:]) + 1} <= present]
    for r in reach:
        assert r.wal[0] == WalSegment.parse(r.backup.start_wal, SEG)
        assert r.wal_end.number + 1 not in present
