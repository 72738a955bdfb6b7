"""WAL names, LSN arithmetic and the WAL page header: pure functions, no I/O.

Kept free of heavy imports: `wal-push` and `wal-fetch` import this on every call.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
_PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
_BACKUP_HISTORY_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
_HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")

# XLogLongPageHeaderData (access/xlog_internal.h): magic u16, info u16, tli u32, pageaddr u64,
# rem_len u32, 4 bytes of padding, then sysid u64, seg_size u32, xlog_blcksz u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
_XLP_LONG_HEADER = 0x0002


@dataclass(frozen=True, order=True)
class Lsn:
    """A WAL location (XLogRecPtr)."""

    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        match = _LSN_RE.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not an LSN; write it as PostgreSQL does, e.g. 0/3000028")
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def segment_number(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return self.value // segment_size


@dataclass(frozen=True, order=True)
class WalSegment:
    """A WAL segment file name: timeline plus segment number."""

    timeline: int
    number: int
    segment_size: int = DEFAULT_SEGMENT_SIZE

    @property
    def name(self) -> str:
        per_log = 0x100000000 // self.segment_size
        return f"{self.timeline:08X}{self.number // per_log:08X}{self.number % per_log:08X}"

    @classmethod
    def parse(cls, name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalSegment:
        if not _SEGMENT_RE.match(name):
            raise ValueError(f"{name!r} is not a WAL segment name (24 hex digits)")
        per_log = 0x100000000 // segment_size
        return cls(int(name[0:8], 16), int(name[8:16], 16) * per_log + int(name[16:24], 16), segment_size)

    @classmethod
    def containing(cls, timeline: int, lsn: Lsn, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalSegment:
        return cls(timeline, lsn.segment_number(segment_size), segment_size)

    @property
    def start_lsn(self) -> Lsn:
        return Lsn(self.number * self.segment_size)

    @property
    def end_lsn(self) -> Lsn:
        return Lsn((self.number + 1) * self.segment_size)

    def next(self) -> WalSegment:
        return WalSegment(self.timeline, self.number + 1, self.segment_size)

    def __str__(self) -> str:
        return self.name


def segments_between(first: WalSegment, last: WalSegment) -> list[WalSegment]:
    """Every segment from first to last inclusive, on first's timeline."""
    return [WalSegment(first.timeline, n, first.segment_size) for n in range(first.number, last.number + 1)]


def is_segment(name: str) -> bool:
    return bool(_SEGMENT_RE.match(name))


def is_partial(name: str) -> bool:
    return bool(_PARTIAL_RE.match(name))


def is_history(name: str) -> bool:
    return bool(_HISTORY_RE.match(name))


def is_backup_history(name: str) -> bool:
    return bool(_BACKUP_HISTORY_RE.match(name))


def is_archivable(name: str) -> bool:
    """A name PostgreSQL hands to archive_command or asks of restore_command."""
    return is_segment(name) or is_partial(name) or is_history(name) or is_backup_history(name)


@dataclass(frozen=True)
class PageHeader:
    magic: int
    timeline: int
    page_address: Lsn
    system_id: int
    segment_size: int
    block_size: int


def parse_long_header(data: bytes) -> PageHeader:
    """Parse the long page header that starts every WAL segment."""
    if len(data) < _LONG_HEADER.size:
        raise ValueError("too short to hold a WAL page header")
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG_HEADER.unpack_from(data)
    if not info & _XLP_LONG_HEADER:
        raise ValueError("first page lacks the long header every WAL segment starts with")
    return PageHeader(magic, tli, Lsn(pageaddr), sysid, seg_size, blcksz)


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a .history file: `parent` ran until `switch_lsn`, then the child began."""

    parent: int
    switch_lsn: Lsn
    reason: str


def parse_history(text: str) -> list[TimelineSwitch]:
    """Parse a timeline history file (`<parentTLI>\\t<switchpoint>\\t<reason>` per line)."""
    switches: list[TimelineSwitch] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2:
            raise ValueError(f"malformed history line: {line!r}")
        switches.append(
            TimelineSwitch(int(fields[0]), Lsn.parse(fields[1]), fields[2] if len(fields) > 2 else "")
        )
    return switches
