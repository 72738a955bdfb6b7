"""Retention: which backups and which WAL to keep, as a pure function of the catalog, the policy and the clock.

`plan_expiry(inventory, policy, now) -> Plan` takes plain data and returns plain data: no storage,
no clock, no logging (DESIGN.md: "retention.py knows nothing of storage"). `expire.py` gathers the
inventory from the repository and carries the plan out. Keeping is always safe and deleting is not,
so wherever a rule below cannot be sure, it keeps.

Backups
-------
Only valid backups (those with a sentinel) are in the inventory. A backup is kept when at least one
of these holds, and the plan records every reason that holds:

- ``pinned``: `pgvault keep ID` placed a pin on it.
- ``min_backups``: it is one of the newest `min_backups` backups. "Newest" is by stop time (then
  stop LSN, then id), because that is what people and the GFS buckets mean by it.
- ``daily YYYY-MM-DD`` / ``weekly YYYY-Www`` / ``monthly YYYY-MM`` (grandfather-father-son): the
  backups are put in buckets by the day, ISO week and month of their stop time (when the backup
  became restorable) in `retention.timezone`; of the most recent N buckets of each kind that hold a
  backup, the newest backup of each is kept. N = 0 keeps nothing for that kind.
- ``pitr``: it is needed so that every moment of `pitr_window` stays restorable (below).
- ``future``: it ended after `now`. Some clock is wrong; nothing is decided about such a backup.

Every other backup is deleted.

Timelines
---------
A timeline's lineage (which timeline holds its history up to which LSN) comes from its history
file, exactly as PostgreSQL and `restore` read it; a timeline above 1 whose history file is missing
has, for them, no parents. A segment number n is *covered* by a lineage span when
``begin // segment_size <= n <= end // segment_size``: the segment holding a switch point is covered
by both the parent and the child, and both versions are kept. Recovery along a lineage can use a
segment number when some covering span's timeline has that segment archived (window.wal_run).

Keeping WAL
-----------
A WAL file is a segment, a ``.partial`` or a ``.backup`` file; each belongs to (timeline, segment
number) of the segment it is named after. It is deleted only when no rule below keeps it:

1. Consistency of retained backups: for every retained backup and for every timeline whose lineage
   the backup lies on (its own, and descendants that branched after it), the segments from its start
   segment to its stop segment along that lineage; also its start and stop segments by name.
2. The PITR window, per timeline T that was not superseded before the window began (below):
   walking the window from `cutoff = now - pitr_window` to `now`, restore picks for a moment m the
   newest restorable backup that ended by m. The backup restore would pick for the cutoff (the
   newest restorable backup on T's lineage that ended at or before the cutoff; if there is none,
   the oldest restorable one) is kept with reason ``pitr``; then for every later moment, if the
   backups retained so far would reach less far through the archived WAL than the backup restore
   picks today (a gap in the archive cuts a WAL run short), that backup is kept with reason ``pitr``
   too. All WAL along T's lineage from the earliest start segment of these backups onwards is kept.
   So any moment of the window that could be restored before expiry can be restored after it.
3. Nothing at or above the start segment of the newest backup (by stop time) is deleted, on any
   timeline: WAL being archived now, and WAL a backup in flight will need, is never touched.
4. A timeline above 1 without a history file is a damaged repository (PostgreSQL archives the
   history file first) or one still being written: none of its own WAL is deleted, and the ranges
   kept for it by rules 1 and 2 also cover every lower timeline, since its real parents are unknown.
5. Timeline history files (``.history``) are always kept, and so is any name retention does not
   understand.

A timeline T is *superseded before the window* when a backup on a higher timeline started at or
before the cutoff: timeline ids only grow, so T had been replaced (failover, or a restore that
branched) before the window began, and T's own tail after its switch point has no moment inside
the window. Its history before the switch stays protected through the lineage of its successors.
Without this rule every old timeline would keep one backup and its WAL forever. It is wrong only if
two primaries wrote to one repository at once (split brain), which pgvault does not support.

Two backups whose order by stop time and by stop LSN disagree on one lineage (clock skew) are
handled: the window walk uses restore's own order (stop LSN) and only compares how far WAL runs reach.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from pgvault.config import RetentionConfig
from pgvault.pg.wal import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    TimelineSwitch,
    WalSegment,
    is_backup_history,
    is_partial,
    is_segment,
)

_INFINITY = 2**64 - 1


@dataclass(frozen=True)
class BackupFacts:
    """What retention needs to know of one valid backup (from its sentinel)."""

    id: str
    timeline: int
    start_lsn: Lsn
    stop_lsn: Lsn
    start_time: datetime
    stop_time: datetime
    start_wal: str
    stop_wal: str


@dataclass(frozen=True)
class Inventory:
    """A repository's contents as plain data."""

    backups: Sequence[BackupFacts]
    wal: Sequence[str]  # every archived WAL file name: segments, .partial, .backup, .history
    histories: Mapping[int, Sequence[TimelineSwitch]] = field(default_factory=dict)  # parsed .history files
    pins: frozenset[str] = frozenset()
    segment_size: int = DEFAULT_SEGMENT_SIZE


@dataclass(frozen=True)
class KeptBackup:
    id: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class WalRange:
    """Consecutive segment numbers of one timeline, with how many WAL files they stand for."""

    timeline: int
    first: int
    last: int
    files: int
    segment_size: int = DEFAULT_SEGMENT_SIZE

    @property
    def first_name(self) -> str:
        return WalSegment(self.timeline, self.first, self.segment_size).name

    @property
    def last_name(self) -> str:
        return WalSegment(self.timeline, self.last, self.segment_size).name

    def as_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "first": self.first_name, "last": self.last_name, "files": self.files}


@dataclass(frozen=True)
class Plan:
    now: datetime
    cutoff: datetime  # now - pitr_window: the first moment the window protects
    kept: tuple[KeptBackup, ...]  # newest first
    deleted: tuple[str, ...]  # backup ids, oldest first
    deleted_wal: tuple[str, ...]  # WAL file names, sorted
    kept_wal: int  # WAL files (any kind) left in place
    stale_pins: tuple[str, ...]  # pins naming no backup in the inventory
    warnings: tuple[str, ...]
    segment_size: int = DEFAULT_SEGMENT_SIZE

    def reasons(self, backup_id: str) -> tuple[str, ...]:
        return next((k.reasons for k in self.kept if k.id == backup_id), ())

    def deleted_wal_ranges(self) -> list[WalRange]:
        return wal_ranges(self.deleted_wal, self.segment_size)

    @property
    def summary(self) -> str:
        ranges = self.deleted_wal_ranges()
        return (f"keep {len(self.kept)} backup(s), delete {len(self.deleted)}; keep {self.kept_wal} WAL file(s), "
                f"delete {len(self.deleted_wal)} in {len(ranges)} range(s)")

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(), "pitr_cutoff": self.cutoff.isoformat(),
            "kept": [{"id": k.id, "reasons": list(k.reasons)} for k in self.kept],
            "deleted": list(self.deleted),
            "wal_deleted": [r.as_dict() for r in self.deleted_wal_ranges()],
            "wal_deleted_files": len(self.deleted_wal), "wal_kept_files": self.kept_wal,
            "stale_pins": list(self.stale_pins), "warnings": list(self.warnings), "summary": self.summary,
        }


# ---- small pieces ---------------------------------------------------------------------------------

def newest_first_key(b: BackupFacts) -> tuple[datetime, int, str]:
    """"Newest" for people and for the GFS buckets: by stop time, then stop LSN, then id."""
    return (b.stop_time, b.stop_lsn.value, b.id)


def catalog_key(b: BackupFacts) -> tuple[int, datetime, str]:
    """The catalog's (and so restore's) order: by stop LSN, then stop time."""
    return (b.stop_lsn.value, b.stop_time, b.id)


def wal_position(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int] | None:
    """(timeline, segment number) of a segment, .partial or .backup file; None for anything else."""
    if is_segment(name) or is_partial(name) or is_backup_history(name):
        segment = WalSegment.parse(name[:24], segment_size)
        return segment.timeline, segment.number
    return None


def wal_ranges(names: Iterable[str], segment_size: int = DEFAULT_SEGMENT_SIZE) -> list[WalRange]:
    """Collapse WAL file names into runs of consecutive segment numbers per timeline."""
    counts: dict[tuple[int, int], int] = {}
    for name in names:
        position = wal_position(name, segment_size)
        if position is not None:
            counts[position] = counts.get(position, 0) + 1
    ranges: list[WalRange] = []
    for (timeline, number), files in sorted(counts.items()):
        last = ranges[-1] if ranges else None
        if last is not None and last.timeline == timeline and last.last + 1 == number:
            ranges[-1] = WalRange(timeline, last.first, number, last.files + files, segment_size)
        else:
            ranges.append(WalRange(timeline, number, number, files, segment_size))
    return ranges


def bucket_labels(stop_time: datetime, zone: ZoneInfo) -> dict[str, str]:
    """The day, ISO week and month a backup belongs to, as the plan names them."""
    local = stop_time.astimezone(zone)
    year, week, _ = local.isocalendar()
    return {"daily": local.date().isoformat(), "weekly": f"{year}-W{week:02d}", "monthly": f"{local:%Y-%m}"}


@dataclass(frozen=True)
class _Span:
    timeline: int
    begin: int  # LSN
    end: int  # LSN (inclusive), _INFINITY for the lineage's own timeline

    def first_segment(self, size: int) -> int:
        return self.begin // size

    def last_segment(self, size: int) -> int:
        return _INFINITY if self.end == _INFINITY else self.end // size


def _lineage(timeline: int, histories: Mapping[int, Sequence[TimelineSwitch]]) -> list[_Span]:
    """The spans leading to `timeline`, oldest first, as PostgreSQL reads its history file."""
    spans: list[_Span] = []
    begin = 0
    for switch in histories.get(timeline, ()):
        spans.append(_Span(switch.parent, begin, switch.switch_lsn.value))
        begin = switch.switch_lsn.value
    spans.append(_Span(timeline, begin, _INFINITY))
    return spans


def _on_lineage(backup: BackupFacts, spans: Sequence[_Span]) -> bool:
    """Can recovery along `spans` start from this backup? (window.backup_on_path)"""
    return any(s.timeline == backup.timeline and s.begin <= backup.stop_lsn.value <= s.end for s in spans)


class _Runs:
    """The unbroken runs of archived WAL along one lineage, for quick 'how far from here' questions."""

    def __init__(self, spans: Sequence[_Span], present: Mapping[int, set[int]], size: int) -> None:
        usable: set[int] = set()
        for span in spans:
            first, last = span.first_segment(size), span.last_segment(size)
            usable.update(n for n in present.get(span.timeline, ()) if first <= n <= last)
        self._starts: list[int] = []
        self._ends: list[int] = []
        for number in sorted(usable):
            if self._ends and self._ends[-1] + 1 == number:
                self._ends[-1] = number
            else:
                self._starts.append(number)
                self._ends.append(number)

    def end_from(self, number: int) -> int | None:
        """The last segment of the unbroken run starting at `number`; None if `number` is missing."""
        i = bisect.bisect_right(self._starts, number) - 1
        if i >= 0 and self._ends[i] >= number:
            return self._ends[i]
        return None


class _Keep:
    """Segment-number intervals to keep, per timeline."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._intervals: dict[int, list[tuple[int, int]]] = {}
        self._merged: dict[int, tuple[list[int], list[int]]] | None = None

    def add(self, timeline: int, first: int, last: int) -> None:
        if first <= last:
            self._intervals.setdefault(timeline, []).append((first, last))
            self._merged = None

    def along(self, spans: Sequence[_Span], first: int, last: int) -> None:
        """Keep segment numbers first..last as every span covering them has them."""
        for span in spans:
            self.add(span.timeline, max(first, span.first_segment(self.size)), min(last, span.last_segment(self.size)))

    def __contains__(self, position: tuple[int, int]) -> bool:
        if self._merged is None:
            self._merged = {}
            for timeline, intervals in self._intervals.items():
                starts: list[int] = []
                ends: list[int] = []
                for first, last in sorted(intervals):
                    if ends and first <= ends[-1] + 1:
                        ends[-1] = max(ends[-1], last)
                    else:
                        starts.append(first)
                        ends.append(last)
                self._merged[timeline] = (starts, ends)
        timeline, number = position
        starts, ends = self._merged.get(timeline, ([], []))
        i = bisect.bisect_right(starts, number) - 1
        return i >= 0 and ends[i] >= number


# ---- the plan -------------------------------------------------------------------------------------

def plan_expiry(inventory: Inventory, policy: RetentionConfig, now: datetime) -> Plan:
    """Decide what expire keeps and deletes. Pure: the same input always gives the same plan."""
    size = inventory.segment_size
    backups = sorted(inventory.backups, key=newest_first_key)
    ids = {b.id for b in backups}
    cutoff = now - policy.pitr_window
    reasons: dict[str, list[str]] = {b.id: [] for b in backups}
    warnings: list[str] = []

    for b in backups:
        if b.id in inventory.pins:
            reasons[b.id].append("pinned")
    for b in backups[max(0, len(backups) - policy.min_backups):]:
        reasons[b.id].append("min_backups")
    _grandfather_father_son(backups, policy, reasons)
    for b in backups:
        if b.stop_time > now:
            reasons[b.id].append("future")

    present: dict[int, set[int]] = {}
    for name in inventory.wal:
        if is_segment(name):
            segment = WalSegment.parse(name, size)
            present.setdefault(segment.timeline, set()).add(segment.number)
    timelines = _timelines(inventory, present)
    histories = inventory.histories
    lineages = {t: _lineage(t, histories) for t in timelines}
    keep_spans = {t: _keep_spans(t, lineages[t], histories, timelines) for t in timelines}
    runs = {t: _Runs(lineages[t], present, size) for t in timelines}
    keep = _Keep(size)
    for t in timelines:
        if t > 1 and t not in histories:
            keep.add(t, 0, _INFINITY)
            warnings.append(f"timeline {t} has no history file ({t:08X}.history) in the repository, so none of "
                            "its WAL is deleted; archive it again from pg_wal of the server that created it "
                            "(pgvault wal-push)")

    # 2. The PITR window, per timeline still alive when the window began.
    for t in timelines:
        if any(b.timeline > t and b.start_time <= cutoff for b in backups):
            continue  # superseded before the window began
        first = _protect_window(t, backups, lineages[t], runs[t], reasons, cutoff, now, size)
        if first is not None:
            keep.along(keep_spans[t], first, _INFINITY)

    # 1. Consistency WAL of every retained backup, along every lineage it lies on.
    for b in backups:
        if not reasons[b.id]:
            continue
        start = WalSegment.parse(b.start_wal, size)
        stop = WalSegment.parse(b.stop_wal, size)
        keep.add(start.timeline, start.number, start.number)
        keep.add(stop.timeline, stop.number, stop.number)
        restorable_somewhere = False
        for t in timelines:
            if _on_lineage(b, lineages[t]):
                keep.along(keep_spans[t], start.number, stop.number)
                end = runs[t].end_from(start.number)
                restorable_somewhere |= end is not None and end >= stop.number
        if not restorable_somewhere:
            warnings.append(f"backup {b.id} is kept but cannot be restored: WAL it needs between {b.start_wal} and "
                            f"{b.stop_wal} is missing (pgvault verify shows what)")

    # 3. Nothing at or above the newest backup's start, on any timeline.
    if backups:
        # The newest by stop time is always retained (min_backups >= 1), so the floor never moves
        # because of what this plan deletes.
        floor = WalSegment.parse(backups[-1].start_wal, size).number
        for t in timelines:
            keep.add(t, floor, _INFINITY)

    deleted_wal: list[str] = []
    kept_wal = 0
    for name in inventory.wal:
        position = wal_position(name, size)
        # With no backup at all there is nothing to anchor anything to: delete no WAL.
        if position is None or not backups or position in keep:
            kept_wal += 1
        else:
            deleted_wal.append(name)

    kept = tuple(KeptBackup(b.id, tuple(reasons[b.id])) for b in reversed(backups) if reasons[b.id])
    deleted = tuple(b.id for b in backups if not reasons[b.id])
    return Plan(now=now, cutoff=cutoff, kept=kept, deleted=deleted, deleted_wal=tuple(sorted(deleted_wal)),
                kept_wal=kept_wal, stale_pins=tuple(sorted(inventory.pins - ids)), warnings=tuple(warnings),
                segment_size=size)


def _grandfather_father_son(backups: Sequence[BackupFacts], policy: RetentionConfig,
                            reasons: dict[str, list[str]]) -> None:
    zone = ZoneInfo(policy.timezone)
    keys: dict[str, Callable[[datetime], Any]] = {
        "daily": lambda local: local.date(),
        "weekly": lambda local: local.isocalendar()[:2],
        "monthly": lambda local: (local.year, local.month),
    }
    for kind, count in (("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly)):
        if count <= 0:
            continue
        newest: dict[date | tuple[int, int], BackupFacts] = {}
        for b in backups:  # oldest first: the last one seen in a bucket is its newest
            newest[keys[kind](b.stop_time.astimezone(zone))] = b
        for bucket in sorted(newest, reverse=True)[:count]:
            b = newest[bucket]
            reasons[b.id].append(f"{kind} {bucket_labels(b.stop_time, zone)[kind]}")


def _timelines(inventory: Inventory, present: Mapping[int, set[int]]) -> list[int]:
    known = {1, *present, *inventory.histories, *(b.timeline for b in inventory.backups)}
    for switches in inventory.histories.values():
        known.update(s.parent for s in switches)
    for name in inventory.wal:
        position = wal_position(name, inventory.segment_size)
        if position is not None:
            known.add(position[0])
    return sorted(known)


def _keep_spans(timeline: int, lineage: list[_Span], histories: Mapping[int, Sequence[TimelineSwitch]],
                timelines: Sequence[int]) -> list[_Span]:
    if timeline == 1 or timeline in histories:
        return lineage
    # Its parents are unknown: whatever it needs may be on any lower timeline.
    return [*lineage, *(_Span(t, 0, _INFINITY) for t in timelines if t < timeline)]


def _protect_window(timeline: int, backups: Sequence[BackupFacts], spans: Sequence[_Span], runs: _Runs,
                    reasons: dict[str, list[str]], cutoff: datetime, now: datetime, size: int) -> int | None:
    """Keep (reason pitr) the backups restore needs for every moment of [cutoff, now] on this lineage.

    Returns the first segment number from which WAL must stay continuous, or None if nothing on this
    lineage is restorable.
    """
    reach: list[tuple[BackupFacts, int]] = []  # restorable backups on the lineage, restore's order, run end
    for b in sorted(backups, key=catalog_key):
        if not _on_lineage(b, spans):
            continue
        end = runs.end_from(WalSegment.parse(b.start_wal, size).number)
        if end is not None and end >= WalSegment.parse(b.stop_wal, size).number:
            reach.append((b, end))
    if not reach:
        return None

    def newest_by(moment: datetime, only_kept: bool) -> tuple[BackupFacts, int] | None:
        """The backup restore would choose for a target time `moment` (window.choose_for_time)."""
        found = None
        for b, end in reach:
            if b.stop_time <= moment and (not only_kept or reasons[b.id]):
                found = (b, end)
        return found

    moments = sorted({cutoff, *(b.stop_time for b, _ in reach if cutoff < b.stop_time <= now)})
    moments = [m for m in moments if newest_by(m, only_kept=False) is not None]
    if not moments:
        return None  # nothing on this lineage was restorable by now
    # The anchor: what restore picks for the window's first restorable moment (the newest backup that
    # ended by the cutoff, or else the oldest one). Kept even when an older retained backup would
    # reach as far, so the WAL kept starts there and not earlier.
    anchor = newest_by(moments[0], only_kept=False)
    assert anchor is not None
    if "pitr" not in reasons[anchor[0].id]:
        reasons[anchor[0].id].append("pitr")
    changed = True
    while changed:  # keeping a backup can change restore's pick for other moments: repeat until stable
        changed = False
        for moment in moments:
            wanted = newest_by(moment, only_kept=False)
            have = newest_by(moment, only_kept=True)
            assert wanted is not None
            if (have is None or have[1] < wanted[1]) and "pitr" not in reasons[wanted[0].id]:
                reasons[wanted[0].id].append("pitr")
                changed = True
    starts = []
    for moment in moments:
        have = newest_by(moment, only_kept=True)
        if have is not None:
            starts.append(WalSegment.parse(have[0].start_wal, size).number)
    return min(starts) if starts else None
