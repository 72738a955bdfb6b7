"""verify.py's pure parts and its object checks on a synthetic repository.

- WAL continuity: gaps from each backup's start to the newest segment of every timeline, the windows
  that remain, and backups that cannot become consistent (hand cases and a hypothesis property)
- PostgreSQL's backup_manifest: its own checksum, encoded paths, duplicates
- a WAL object whose compressed bytes match their metadata but whose content does not
- which stored report is the newest
- a repository changing while verify runs (a backup finishing, expire deleting): warnings, not problems
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from pgvault.catalog import BackupRecord, StoredObject
from pgvault.config import Policy
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment
from pgvault.repo.file import FileStorage
from pgvault.repo.layout import Layout
from pgvault.verify import (
    CONTENT,
    MISSING,
    WalGap,
    check_wal,
    continuity,
    latest_verify_report,
    parse_manifest,
    run_verify,
    segments_needed,
)

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def backup(n: int, start: int, stop: int, *, timeline: int = 1) -> BackupRecord:
    """Backup Bn starting in segment `start` and consistent in segment `stop` (LSNs inside them)."""
    start_lsn, stop_lsn = Lsn(start * SEG + 0x28), Lsn(stop * SEG + 0x100)
    return BackupRecord(
        id=f"B{n}", cluster="test", system_id="7300000000000000001", pg_version=150000, timeline=timeline,
        start_lsn=str(start_lsn), stop_lsn=str(stop_lsn), checkpoint_lsn=str(start_lsn),
        start_time=T0 + timedelta(hours=n), stop_time=T0 + timedelta(hours=n, minutes=1),
        start_wal=WalSegment(timeline, start, SEG).name, stop_wal=WalSegment(timeline, stop, SEG).name,
        next_xid=1000, label=f"pgvault B{n}", parts=[],
        manifest=StoredObject(key=f"test/backups/B{n}/backup_manifest.zst", size=1, sha256="0" * 64),
        raw_size=1, stored_size=1, duration_s=1.0, compression={"type": "zstd", "level": 3}, pgvault_version="0.1.0",
    )


def seg(timeline: int, number: int) -> WalSegment:
    return WalSegment(timeline, number, SEG)


def flow_of(records: list[BackupRecord], present: dict[int, set[int]], *,
            histories: dict[int, list[TimelineSwitch]] | None = None, usable: dict[int, set[int]] | None = None):
    histories = histories or {}
    timelines = set(present) | set(histories) | {r.timeline for r in records}
    return continuity(records, histories, present, usable if usable is not None else present, timelines, SEG)


# ---- continuity -----------------------------------------------------------------------------------

def test_unbroken_wal_is_one_window_with_every_backup() -> None:
    a, b = backup(1, 2, 2), backup(2, 5, 6)
    flow = flow_of([a, b], {1: set(range(1, 10))})
    assert flow.gaps == [] and flow.unusable == {}
    assert [(w.timeline, w.wal_end, w.backups, w.earliest_lsn) for w in flow.windows] == [
        (1, seg(1, 9), ("B1", "B2"), a.stop)]


def test_a_gap_between_backups_splits_the_window() -> None:
    a, b = backup(1, 2, 2), backup(2, 6, 7)
    flow = flow_of([a, b], {1: {2, 3, 5, 6, 7, 8}})
    assert flow.gaps == [WalGap(seg(1, 4), seg(1, 4), (1,))]
    assert [(w.wal_end, w.backups, w.earliest_time) for w in flow.windows] == [
        (seg(1, 3), ("B1",), a.stop_time), (seg(1, 8), ("B2",), b.stop_time)]
    assert flow.unusable == {}


def test_segments_before_the_oldest_backup_are_not_needed() -> None:
    flow = flow_of([backup(1, 5, 5)], {1: {1, 5, 6}})  # 2..4 missing, but nothing needs them
    assert flow.gaps == []


def test_wal_missing_inside_a_backup_makes_it_unusable() -> None:
    flow = flow_of([backup(1, 2, 4)], {1: {2, 4, 5}})
    assert flow.gaps == [WalGap(seg(1, 3), seg(1, 3), (1,))]
    assert flow.unusable == {"B1": seg(1, 3)}
    assert flow.windows == []


def test_a_backup_whose_wal_never_arrived_is_a_gap_up_to_its_stop() -> None:
    flow = flow_of([backup(1, 2, 2), backup(2, 6, 7)], {1: {2, 3, 4}})
    assert flow.gaps == [WalGap(seg(1, 5), seg(1, 7), (1,))]
    assert flow.gaps[0].segments == 3
    assert flow.unusable == {"B2": seg(1, 6)}


def test_a_damaged_segment_breaks_windows_but_is_not_a_gap() -> None:
    present = {1: set(range(2, 9))}
    flow = flow_of([backup(1, 2, 2), backup(2, 6, 6)], present, usable={1: present[1] - {4}})
    assert flow.gaps == []  # its damage is reported on the object itself
    assert [(w.wal_end, w.backups) for w in flow.windows] == [(seg(1, 3), ("B1",)), (seg(1, 8), ("B2",))]


# Timeline 2 branched from timeline 1 inside segment 5; the old primary went on to segment 7.
SWITCH = {2: [TimelineSwitch(1, Lsn(5 * SEG + 0x1000), "no recovery target specified")]}


def test_timelines_follow_their_history() -> None:
    flow = flow_of([backup(1, 2, 2)], {1: set(range(2, 8)), 2: {5, 6, 7, 8, 9}}, histories=SWITCH)
    assert flow.gaps == []
    assert [(w.timeline, w.wal_end) for w in flow.windows] == [(1, seg(1, 7)), (2, seg(2, 9))]


def test_a_gap_before_the_switch_is_reported_once_for_both_timelines() -> None:
    flow = flow_of([backup(1, 2, 2)], {1: {2, 4, 5, 6, 7}, 2: {5, 6}}, histories=SWITCH)
    assert flow.gaps == [WalGap(seg(1, 3), seg(1, 3), (1, 2))]
    assert [(w.timeline, w.wal_end) for w in flow.windows] == [(1, seg(1, 2)), (2, seg(1, 2))]


def test_a_failover_that_never_archived_the_old_primarys_last_segment() -> None:
    # The old primary archived up to segment 3; the new timeline starts in 5: 4 is lost for timeline 2.
    flow = flow_of([backup(1, 2, 2)], {1: {2, 3}, 2: {5, 6}}, histories=SWITCH)
    assert flow.gaps == [WalGap(seg(1, 4), seg(1, 4), (2,))]
    assert [(w.timeline, w.wal_end) for w in flow.windows] == [(1, seg(1, 3)), (2, seg(1, 3))]


def test_a_backup_after_the_switch_on_the_old_timeline_is_not_on_the_new_path() -> None:
    late = backup(2, 6, 7)  # taken on timeline 1 after timeline 2 branched off
    flow = flow_of([backup(1, 2, 2), late], {1: set(range(2, 9)), 2: {5, 6}}, histories=SWITCH)
    assert [(w.timeline, w.backups) for w in flow.windows] == [(1, ("B1", "B2")), (2, ("B1",))]


def test_segments_needed_by_one_backup() -> None:
    present = {1: set(range(1, 8)), 2: {5, 6, 7}}
    needed = segments_needed(backup(1, 3, 3), SWITCH, present, {1, 2}, SEG)
    assert needed == {seg(1, n) for n in range(3, 8)} | {seg(2, n) for n in (5, 6, 7)}
    assert segments_needed(backup(2, 6, 6), SWITCH, present, {1, 2}, SEG) == {seg(1, 6), seg(1, 7)}


@st.composite
def archives(draw: st.DrawFn) -> tuple[list[BackupRecord], set[int]]:
    present = draw(st.sets(st.integers(min_value=0, max_value=30), max_size=30))
    starts = draw(st.lists(st.integers(min_value=0, max_value=28), min_size=1, max_size=5))
    records = []
    for n, start in enumerate(sorted(starts)):
        length = draw(st.integers(min_value=0, max_value=2))
        records.append(backup(n, start, start + length))
    return records, present


@given(archives())
def test_gaps_are_exactly_the_missing_segments_and_windows_cover_every_usable_backup(
        case: tuple[list[BackupRecord], set[int]]) -> None:
    records, present = case
    flow = flow_of(records, {1: present})
    first = min(WalSegment.parse(r.start_wal, SEG).number for r in records)
    last = max([*present, *(WalSegment.parse(r.stop_wal, SEG).number for r in records)])
    missing = {n for n in range(first, last + 1) if n not in present}
    reported = {n for g in flow.gaps for n in range(g.first.number, g.last.number + 1)}
    assert reported == missing
    assert all(a.last.number + 1 < b.first.number for a, b in zip(flow.gaps, flow.gaps[1:], strict=False))
    in_windows = [b for w in flow.windows for b in w.backups]
    assert len(in_windows) == len(set(in_windows))
    for record in records:
        start, stop = (WalSegment.parse(record.start_wal, SEG).number, WalSegment.parse(record.stop_wal, SEG).number)
        usable = all(n in present for n in range(start, stop + 1))
        assert (record.id in in_windows) == usable
        assert (record.id in flow.unusable) == (not usable)
    for window in flow.windows:
        assert window.wal_end.number in present and window.wal_end.number + 1 not in present


# ---- PostgreSQL's manifest ----------------------------------------------------------------------

def manifest(files: list[dict], *, tamper: bool = False) -> bytes:
    lines = ['{ "PostgreSQL-Backup-Manifest-Version": 1,', '"Files": [']
    lines += [json.dumps(f) + ("," if i < len(files) - 1 else "") for i, f in enumerate(files)]
    lines += ["],", '"WAL-Ranges": [', '{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }', "],"]
    body = ("\n".join(lines) + "\n").encode()
    checksum = hashlib.sha256(body).hexdigest()
    if tamper:
        body = body.replace(b'"Size": 3', b'"Size": 4')
    return body + f'"Manifest-Checksum": "{checksum}"}}\n'.encode()


ENTRY = {"Path": "PG_VERSION", "Size": 3, "Checksum-Algorithm": "SHA256", "Checksum": "ab" * 32}


def test_manifest_checksum_and_entries() -> None:
    encoded = {"Encoded-Path": "caf\xe9".encode("latin-1").hex(), "Size": 1, "Checksum-Algorithm": "SHA256",
               "Checksum": "CD" * 32}
    files, ranges, problems = parse_manifest(manifest([ENTRY, encoded]))
    assert problems == []
    assert files["PG_VERSION"].size == 3 and files["PG_VERSION"].checksum == "ab" * 32
    assert files["caf\udce9"].checksum == "cd" * 32  # surrogateescape, as tarfile names such a member
    assert ranges == [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]


def test_manifest_problems_are_named() -> None:
    assert parse_manifest(manifest([ENTRY], tamper=True))[2] == ["its Manifest-Checksum does not match its content"]
    assert parse_manifest(manifest([ENTRY, ENTRY]))[2] == ["lists PG_VERSION twice"]
    assert parse_manifest(b"{ not json")[2] == ["is not valid JSON"]


# ---- a WAL object's content ---------------------------------------------------------------------

SMALL_SEG = 1024 * 1024  # PostgreSQL allows 1 MiB segments; keeps this test light


def segment_bytes(system_id: int, number: int, *, timeline: int = 1) -> bytes:
    # XLogLongPageHeaderData: magic, info (XLP_LONG_HEADER), tli, pageaddr, rem_len, pad, sysid, seg size, blcksz
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, number * SMALL_SEG, 0, system_id, SMALL_SEG, 8192)
    return header + b"\x01" * (SMALL_SEG - len(header))


def push(storage: FileStorage, name: str, raw: bytes, *, recorded_raw: bytes | None = None) -> str:
    key = Layout("test").wal_key(name)
    digest = hashlib.sha256(recorded_raw if recorded_raw is not None else raw).hexdigest()
    storage.put(key, io.BytesIO(zstandard.ZstdCompressor().compress(raw)),
                extra={"raw_sha256": digest, "raw_size": str(len(raw))})
    return key


def test_wal_content_is_checked_against_raw_sha256_and_header(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    name = WalSegment(1, 3, SMALL_SEG).name
    good = push(storage, name, segment_bytes(42, 3))
    outcome = check_wal(storage, good, name, system_id="42", segment_size=SMALL_SEG)
    assert outcome.problems == [] and outcome.usable
    assert outcome.counts["wal_raw_bytes"] == SMALL_SEG

    # Stored bytes and their metadata agree, but the content is not what was archived.
    other = WalSegment(1, 4, SMALL_SEG).name
    key = push(storage, other, segment_bytes(42, 4), recorded_raw=segment_bytes(42, 4)[:-1] + b"\x02")
    outcome = check_wal(storage, key, other, system_id="42", segment_size=SMALL_SEG)
    assert [(p.key, p.kind) for p in outcome.problems] == [(key, CONTENT)]
    assert "raw SHA-256 differs" in outcome.problems[0].message and not outcome.usable

    # Another system's WAL, and a segment whose header names another position.
    foreign = WalSegment(1, 5, SMALL_SEG).name
    key = push(storage, foreign, segment_bytes(7, 5))
    assert "belongs to database system 7" in check_wal(storage, key, foreign, system_id="42",
                                                       segment_size=SMALL_SEG).problems[0].message
    moved = WalSegment(1, 6, SMALL_SEG).name
    key = push(storage, moved, segment_bytes(42, 9))
    assert "page header says" in check_wal(storage, key, moved, system_id="42",
                                           segment_size=SMALL_SEG).problems[0].message


# ---- the stored report --------------------------------------------------------------------------

def test_latest_report_is_the_newest_by_id(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    layout = Layout("test")
    assert latest_verify_report(storage, "test") is None
    for report_id in ("20261126T033000Z", "20261126T033000Z-2", "20261126T033000Z-10", "20261125T233000Z",
                      "not-a-report"):
        storage.put(layout.verify_report_key(report_id), io.BytesIO(json.dumps({"id": report_id}).encode()))
    assert latest_verify_report(storage, "test") == {"id": "20261126T033000Z-10"}
    assert latest_verify_report(storage, "other") is None


def test_a_damaged_latest_report_is_an_error(tmp_path: Path) -> None:
    from pgvault.errors import IntegrityError

    storage = FileStorage(tmp_path)
    key = Layout("test").verify_report_key("20261126T033000Z")
    storage.put(key, io.BytesIO(b'{"ok": true}'))
    (tmp_path / key).write_bytes(b'{"ok": false}')
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        latest_verify_report(storage, "test")


# ---- a repository changing while verify runs ----------------------------------------------------
#
# The progress callback is the hook: verify reports each step before it takes it, so the test can
# change the repository exactly between the listing and the checks, as a backup or expire would.

def small_repo(tmp_path: Path) -> tuple[Policy, FileStorage]:
    from pgvault.config import parse_policy

    storage = FileStorage(tmp_path)
    info = {"format": 1, "cluster": "test", "system_id": "42", "pg_version": 150000,
            "wal_segment_size": SMALL_SEG, "created": T0.isoformat()}
    storage.put("test/cluster.json", io.BytesIO(json.dumps(info).encode()))
    policy = parse_policy({"cluster": "test", "postgres": {"conninfo": "host=127.0.0.1"},
                           "repository": {"url": f"file://{tmp_path}"}}, "test")
    return policy, storage


def unfinished_backup(storage: FileStorage) -> Layout:
    """A backup directory with a part and a manifest but no sentinel."""
    layout = Layout("test")
    storage.put(layout.part_key("B1", 0), io.BytesIO(b"part"))
    storage.put(layout.manifest_key("B1"), io.BytesIO(b"manifest"))
    return layout


def hook(step: str, action: Callable[[], None]) -> Callable[[str], None]:
    def progress(message: str) -> None:
        if message.startswith(step):
            action()
    return progress


def test_a_lost_sentinel_is_a_problem(tmp_path: Path) -> None:
    policy, storage = small_repo(tmp_path)
    layout = unfinished_backup(storage)
    report = run_verify(policy, storage)
    assert [(p.key, p.kind) for p in report.problems] == [(layout.sentinel_key("B1"), MISSING)]
    assert report.backups == [{"id": "B1", "ok": False, "problems": 1, "timeline": None, "parts": None}]


def test_a_backup_finishing_or_being_expired_meanwhile_is_no_problem(tmp_path: Path) -> None:
    policy, storage = small_repo(tmp_path)
    layout = unfinished_backup(storage)
    finished = run_verify(policy, storage, progress=hook("verify: WAL continuity", lambda: storage.put(
        layout.sentinel_key("B1"), io.BytesIO(b"{}"))))
    assert finished.ok and "backup B1 completed while verify ran; it is checked next time" in finished.warnings
    storage.delete([layout.sentinel_key("B1")])
    expired = run_verify(policy, storage, progress=hook("verify: WAL continuity", lambda: storage.delete(
        [layout.part_key("B1", 0)])))
    assert expired.ok and "backup B1 was removed while verify ran" in expired.warnings


def test_wal_expired_meanwhile_is_no_problem_unless_a_backup_needed_it(tmp_path: Path) -> None:
    policy, storage = small_repo(tmp_path)
    names = [WalSegment(1, n, SMALL_SEG).name for n in (1, 2)]
    keys = [push(storage, name, segment_bytes(42, n)) for n, name in zip((1, 2), names, strict=True)]
    report = run_verify(policy, storage, progress=hook("verify: 2 WAL object(s)", lambda: storage.delete(keys[:1])))
    assert report.ok, report.problems
    assert f"{keys[0]}: removed while verify ran" in report.warnings
    assert report.checked["wal_segments"] == 1


def test_debris_is_a_warning_not_a_backup(tmp_path: Path) -> None:
    policy, storage = small_repo(tmp_path)
    storage.put(Layout("test").part_key("B9", 0), io.BytesIO(b"half a backup"))
    report = run_verify(policy, storage)
    assert report.ok and report.backups == []
    assert any("B9: no sentinel and no manifest" in w for w in report.warnings)


def test_nothing_to_verify_is_an_error(tmp_path: Path) -> None:
    from pgvault.errors import RepositoryError

    policy, storage = small_repo(tmp_path)
    with pytest.raises(RepositoryError, match="no backup 'B1' in this repository"):
        run_verify(policy, storage, backup_id="B1")
    storage.delete(["test/cluster.json"])
    with pytest.raises(RepositoryError, match="cluster 'test' is not in this repository"):
        run_verify(policy, storage)


def test_an_unreadable_sidecar_is_a_problem_naming_the_object(tmp_path: Path) -> None:
    policy, storage = small_repo(tmp_path)
    (tmp_path / "test/cluster.json.meta").write_text("{ not json")
    report = run_verify(policy, storage)
    assert [(p.key, p.kind) for p in report.problems] == [("test/cluster.json", "unreadable")]
    assert "metadata of" in report.problems[0].message
