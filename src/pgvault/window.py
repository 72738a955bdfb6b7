"""Pure reasoning about what a repository can recover: timelines, WAL continuity, backup choice.

No storage and no clock here: the functions take the catalog's data and return data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pgvault.catalog import BackupRecord
from pgvault.errors import TargetUnreachable
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment

_INFINITY = Lsn(2**64 - 1)


@dataclass(frozen=True)
class TimelineSpan:
    """Timeline `timeline` holds the history of the target timeline from begin to end."""

    timeline: int
    begin: Lsn
    end: Lsn


def ancestry(timeline: int, history: Sequence[TimelineSwitch]) -> list[TimelineSpan]:
    """The chain of timelines that leads to `timeline`, oldest first, from its .history file."""
    spans: list[TimelineSpan] = []
    begin = Lsn(0)
    for switch in history:
        spans.append(TimelineSpan(switch.parent, begin, switch.switch_lsn))
        begin = switch.switch_lsn
    spans.append(TimelineSpan(timeline, begin, _INFINITY))
    return spans


def backup_on_path(backup: BackupRecord, spans: Sequence[TimelineSpan]) -> bool:
    """Can recovery along `spans` start from this backup?"""
    return any(s.timeline == backup.timeline and s.begin <= backup.stop <= s.end for s in spans)


def wal_run(
    start: WalSegment, spans: Sequence[TimelineSpan], segments: dict[int, set[int]], segment_size: int
) -> list[WalSegment]:
    """The unbroken run of archived WAL from `start` along `spans` (empty if `start` is missing).

    For each segment number the newest timeline whose span covers it is taken, as PostgreSQL's
    recovery does.
    """
    run: list[WalSegment] = []
    number = start.number
    while True:
        seg_begin = Lsn(number * segment_size)
        seg_end = Lsn((number + 1) * segment_size)
        found = None
        for span in reversed(spans):
            if span.begin < seg_end and seg_begin <= span.end and number in segments.get(span.timeline, ()):
                found = WalSegment(span.timeline, number, segment_size)
                break
        if found is None:
            return run
        run.append(found)
        number += 1


@dataclass(frozen=True)
class BackupReach:
    """How far one backup can recover along a timeline path."""

    backup: BackupRecord
    wal: list[WalSegment]  # its unbroken WAL run, from the backup's start segment on

    @property
    def wal_end(self) -> WalSegment:
        return self.wal[-1]


def reachable_backups(
    backups: Sequence[BackupRecord], spans: Sequence[TimelineSpan], segments: dict[int, set[int]],
    segment_size: int,
) -> list[BackupReach]:
    """Backups on the path whose WAL reaches at least their consistency point, oldest first."""
    result = []
    for backup in backups:
        if not backup_on_path(backup, spans):
            continue
        start = WalSegment.parse(backup.start_wal, segment_size)
        run = wal_run(start, spans, segments, segment_size)
        stop_segment = WalSegment.parse(backup.stop_wal, segment_size)
        if not run or run[-1].number < stop_segment.number:
            continue
        result.append(BackupReach(backup, run))
    return result


def choose_for_time(reach: Sequence[BackupReach], target: datetime) -> BackupReach:
    candidates = [r for r in reach if r.backup.stop_time <= target]
    if not candidates:
        _before_earliest(reach, f"time {target.isoformat(sep=' ')}")
    return candidates[-1]


def choose_for_lsn(reach: Sequence[BackupReach], target: Lsn) -> BackupReach:
    candidates = [r for r in reach if r.backup.stop <= target]
    if not candidates:
        _before_earliest(reach, f"LSN {target}")
    return candidates[-1]


def _before_earliest(reach: Sequence[BackupReach], what: str) -> None:
    if not reach:
        raise TargetUnreachable("the repository holds no restorable backup for this timeline",
                                hint="take one with pgvault backup")
    first = reach[0].backup
    raise TargetUnreachable(
        f"target {what} is before the end of the earliest usable backup {first.id} "
        f"(consistent at {first.stop_time.isoformat(sep=' ', timespec='seconds')}, LSN {first.stop_lsn})",
        hint="choose a later target; pgvault info shows the recoverable window",
    )


def by_id(reach: Sequence[BackupReach], backups: Sequence[BackupRecord], backup_id: str) -> BackupReach:
    for r in reach:
        if r.backup.id == backup_id:
            return r
    if any(b.id == backup_id for b in backups):
        raise TargetUnreachable(f"backup {backup_id} cannot reach this target timeline, or the WAL it needs "
                                "to become consistent is missing",
                                hint="pgvault info shows which backups can reach which timelines")
    raise TargetUnreachable(f"no backup {backup_id} in this repository", hint="pgvault list shows backup ids")
