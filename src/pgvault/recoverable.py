"""What a repository can recover, read from its backups and archived WAL.

The pure reasoning lives in window.py; this module feeds it the catalog and reads WAL contents
(commit times, restore points) with pg_waldump where a question needs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pgvault import archive
from pgvault.catalog import BackupRecord, Catalog, ClusterInfo
from pgvault.errors import TargetUnreachable
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment
from pgvault.pg.waldump import WalEvent, WalReader
from pgvault.repo.base import Storage
from pgvault.window import BackupReach, TimelineSpan, ancestry, reachable_backups

XACT_KINDS = ("COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED")
# Segments handed to one pg_waldump run while scanning backwards.
_BATCH = 8
_CACHED_DUMPS = 4


@dataclass(frozen=True)
class RecoverableWindow:
    """The earliest and latest targets a restore on `timeline` can reach."""

    timeline: int
    earliest_time: datetime | None
    earliest_lsn: Lsn | None
    latest_time: datetime | None  # the last archived commit: a time target must be before it
    latest_lsn: Lsn | None  # the last archived record pgvault saw
    wal_end: str | None  # the last segment of the unbroken WAL run
    backups: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "timeline": self.timeline,
            "earliest_time": self.earliest_time.isoformat() if self.earliest_time else None,
            "earliest_lsn": str(self.earliest_lsn) if self.earliest_lsn else None,
            "latest_time": self.latest_time.isoformat() if self.latest_time else None,
            "latest_lsn": str(self.latest_lsn) if self.latest_lsn else None,
            "wal_end": self.wal_end,
            "backups": self.backups,
        }


class Recoverable:
    def __init__(self, storage: Storage, cluster: str, waldump: str) -> None:
        self.catalog = Catalog(storage, cluster)
        self.info: ClusterInfo = self.catalog.require_cluster_info()
        self.segment_size = self.info.wal_segment_size
        self.backups: list[BackupRecord] = self.catalog.backups()
        wal = self.catalog.archived_wal(self.segment_size)
        self.histories: dict[int, list[TimelineSwitch]] = wal.histories
        self.segments: dict[int, set[int]] = {tli: {s.number for s in segs} for tli, segs in wal.segments.items()}
        self._reader = WalReader(self._fetch, waldump)
        # Choosing a backup, checking the target and the window read the same newest segments: keep
        # the last few dumps rather than fetch and dump them again.
        self._dumps: OrderedDict[tuple[tuple[str, ...], bool], list[WalEvent]] = OrderedDict()

    def _events(self, segments: Sequence[WalSegment], *, every_record: bool = False) -> list[WalEvent]:
        key = (tuple(s.name for s in segments), every_record)
        if key in self._dumps:
            self._dumps.move_to_end(key)
            return self._dumps[key]
        events = self._reader.events(segments, every_record=every_record)
        self._dumps[key] = events
        if len(self._dumps) > _CACHED_DUMPS:
            self._dumps.popitem(last=False)
        return events

    def _fetch(self, name: str, dest: Path) -> None:
        archive.fetch(self.catalog.storage, self.catalog.layout, name, dest)

    # timelines ----------------------------------------------------------------------------
    def timelines(self) -> list[int]:
        known = set(self.histories) | set(self.segments) | {b.timeline for b in self.backups}
        return sorted(known)

    def resolve_timeline(self, choice: int | str, backup: BackupRecord | None = None) -> int:
        known = self.timelines()
        if choice == "latest":
            return known[-1] if known else 1
        if choice == "current":
            if backup is None:
                return known[0] if known else 1
            return backup.timeline
        assert isinstance(choice, int)
        if choice not in known:
            listed = ", ".join(str(t) for t in known) or "none"
            raise TargetUnreachable(f"timeline {choice} does not exist in the repository (timelines: {listed})",
                                    hint="use --target-timeline latest, current, or one of those")
        return choice

    def spans(self, timeline: int) -> list[TimelineSpan]:
        return ancestry(timeline, self.histories.get(timeline, []))

    def reach(self, timeline: int) -> list[BackupReach]:
        return reachable_backups(self.backups, self.spans(timeline), self.segments, self.segment_size)

    # WAL contents -------------------------------------------------------------------------
    def _batches_backwards(self, run: Sequence[WalSegment]) -> list[list[WalSegment]]:
        """Cut run into same-timeline batches, newest batch first."""
        batches: list[list[WalSegment]] = []
        for seg in reversed(run):
            if batches and batches[-1][0].timeline == seg.timeline and len(batches[-1]) < _BATCH:
                batches[-1].insert(0, seg)
            else:
                batches.append([seg])
        return batches

    def find_last(self, run: Sequence[WalSegment], wanted: Callable[[WalEvent], bool]) -> WalEvent | None:
        """The newest event in run for which wanted() holds, scanning from the end backwards."""
        for batch in self._batches_backwards(run):
            hits = [e for e in self._events(batch) if wanted(e)]
            if hits:
                return hits[-1]
        return None

    def last_record_lsn(self, run: Sequence[WalSegment]) -> Lsn | None:
        """Where the newest archived WAL record starts: the last LSN a target can name."""
        if not run:
            return None
        events = self._events(run[-1:], every_record=True)
        return events[-1].lsn if events else None

    def window(self, timeline: int) -> RecoverableWindow:
        reach = self.reach(timeline)
        if not reach:
            return RecoverableWindow(timeline, None, None, None, None, None, [])
        first = reach[0].backup
        longest = max(reach, key=lambda r: r.wal_end.number)
        stop_seg = WalSegment.parse(longest.backup.stop_wal, self.segment_size)
        tail = [s for s in longest.wal if s.number >= stop_seg.number]
        last_xact = self.find_last(tail, lambda e: e.kind in XACT_KINDS)
        latest_time = None
        if last_xact is not None and last_xact.time is not None and last_xact.lsn >= longest.backup.stop:
            latest_time = last_xact.time
        latest_lsn = self.last_record_lsn(tail) or longest.backup.stop
        return RecoverableWindow(
            timeline=timeline, earliest_time=first.stop_time, earliest_lsn=first.stop,
            latest_time=latest_time, latest_lsn=max(latest_lsn, longest.backup.stop),
            wal_end=longest.wal_end.name, backups=[r.backup.id for r in reach],
        )
