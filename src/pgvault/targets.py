"""Recovery targets: what a restore aims at, parsed and checked before anything is touched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pgvault.errors import UsageError
from pgvault.pg.wal import Lsn

TargetKind = Literal["time", "lsn", "xid", "name", "immediate", "end"]
TimelineChoice = int | Literal["current", "latest"]

_TZ_SUFFIX = re.compile(r"(Z|[+-]\d{2}(:?\d{2})?)$", re.IGNORECASE)


def parse_target_time(text: str) -> datetime:
    """Parse '2026-11-20 14:30:00+00' (ISO 8601, a time zone required) into an aware datetime."""
    value = text.strip()
    if not value:
        raise ValueError("is empty; give a time such as '2026-11-20 14:30:00+00'")
    if re.fullmatch(r"\d{4}-?\d{2}-?\d{2}\s*([+-][\d:]*|Z)?", value, re.IGNORECASE):
        # Python reads '2026-11-20+05' as 05:00 without a zone; say what is missing instead.
        raise ValueError(f"{text!r} has no time of day; write e.g. '{value[:10]} 00:00:00+00'")
    normalized = value.replace("t", "T").replace("z", "Z")
    if normalized.endswith("Z"):
        normalized = normalized[:-1] + "+00:00"
    # Python wants +HH:MM; PostgreSQL's own output is +HH.
    normalized = re.sub(r"([+-]\d{2})$", r"\1:00", normalized)
    normalized = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", normalized)
    try:
        parsed = datetime.fromisoformat(normalized)
    except ValueError:
        raise ValueError(f"{text!r} is not a time; write e.g. '2026-11-20 14:30:00+00'") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add one, e.g. '{value}+00' for UTC")
    return parsed


def parse_timeline(text: str) -> TimelineChoice:
    value = text.strip().lower()
    if value in ("current", "latest"):
        return value  # type: ignore[return-value]
    try:
        number = int(value, 16) if value.startswith("0x") else int(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a timeline; use current, latest or a number") from None
    if number < 1:
        raise ValueError("timelines start at 1")
    return number


@dataclass(frozen=True)
class RecoveryTarget:
    kind: TargetKind = "end"
    time: datetime | None = None
    lsn: Lsn | None = None
    xid: int | None = None
    name: str | None = None
    inclusive: bool = True
    action: Literal["promote", "pause", "shutdown"] = "promote"
    timeline: TimelineChoice = "latest"

    def describe(self) -> str:
        text = self._describe_point()
        return f"{text} (exclusive)" if not self.inclusive else text

    def _describe_point(self) -> str:
        match self.kind:
            case "time":
                return f"time {self.time.isoformat(sep=' ')}" if self.time else "time"
            case "lsn":
                return f"LSN {self.lsn}"
            case "xid":
                return f"xid {self.xid}"
            case "name":
                return f"restore point {self.name!r}"
            case "immediate":
                return "the end of the backup (immediate)"
        return "the end of the archived WAL"


def make_target(
    *, time: datetime | None = None, lsn: Lsn | None = None, xid: int | None = None, name: str | None = None,
    immediate: bool = False, inclusive: bool = True, action: str = "promote",
    timeline: TimelineChoice = "latest",
) -> RecoveryTarget:
    given = [flag for flag, value in (("--target-time", time), ("--target-lsn", lsn), ("--target-xid", xid),
                                      ("--target-name", name), ("--target immediate", immediate or None))
             if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one recovery target, not {' and '.join(given)}",
                         hint="PostgreSQL recovers to a single target; drop all but one")
    if not inclusive and (immediate or not given):
        raise UsageError("--target-exclusive needs --target-time, --target-lsn or --target-xid")
    if not inclusive and name is not None:
        raise UsageError("--target-exclusive does not apply to --target-name (a restore point is a position)")
    kind: TargetKind = "end"
    if time is not None:
        kind = "time"
    elif lsn is not None:
        kind = "lsn"
    elif xid is not None:
        kind = "xid"
    elif name is not None:
        kind = "name"
    elif immediate:
        kind = "immediate"
    if kind == "end" and action != "promote":
        raise UsageError(f"--target-action {action} needs a recovery target; without one recovery runs to "
                         "the end of the archive and promotes")
    return RecoveryTarget(kind=kind, time=time, lsn=lsn, xid=xid, name=name, inclusive=inclusive,
                          action=action, timeline=timeline)  # type: ignore[arg-type]
