"""Reading commit times, xids and restore points out of archived WAL with PostgreSQL's pg_waldump.

This is how pgvault knows the true end of the recoverable window (the last commit in the archive)
and where a restore point or transaction lies, so it can refuse a target before writing anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pgvault.errors import PostgresError
from pgvault.pg.wal import Lsn, WalSegment


def waldump_path(bindir: Path | None, pg_version: int) -> str:
    """pg_waldump of the cluster's major version: from postgres.bindir if set, else found like pg_ctl."""
    if bindir is not None:
        return str(bindir / "pg_waldump")
    from pgvault.pg.instance import pg_tool

    return pg_tool("pg_waldump", pg_version // 10000)

_LINE = re.compile(
    r"^rmgr: (?P<rmgr>\w+)\s+len \(rec/tot\):\s+\d+/\s*(?P<tot>\d+), tx:\s+(?P<xid>\d+), "
    r"lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), prev [0-9A-F]+/[0-9A-F]+, desc: (?P<desc>.*)$"
)
_XACT = re.compile(r"^(?P<kind>COMMIT|ABORT|COMMIT_PREPARED|ABORT_PREPARED)(?: \d+)? "
                   r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
_RESTORE_POINT = re.compile(r"^RESTORE_POINT (?P<name>.*)$")


@dataclass(frozen=True)
class WalEvent:
    """A record that can end recovery: a transaction's end or a named restore point."""

    lsn: Lsn
    end: Lsn
    kind: str  # COMMIT, ABORT, ..., RESTORE_POINT, SWITCH
    xid: int
    time: datetime | None = None
    name: str | None = None


def parse_events(output: str, *, every_record: bool = False) -> list[WalEvent]:
    """Events that can end recovery; with every_record, also every other record (kind = its rmgr)."""
    events = []
    for line in output.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        lsn = Lsn.parse(match["lsn"])
        end = Lsn(lsn.value + int(match["tot"]))
        desc = match["desc"]
        xid = int(match["xid"])
        if match["rmgr"] == "Transaction":
            xact = _XACT.match(desc)
            if xact:
                when = datetime.fromisoformat(xact["time"] + "+00:00")
                events.append(WalEvent(lsn, end, xact["kind"], xid, time=when))
        elif match["rmgr"] == "XLOG":
            point = _RESTORE_POINT.match(desc)
            if point:
                events.append(WalEvent(lsn, end, "RESTORE_POINT", xid, name=point["name"]))
            elif desc.startswith("SWITCH"):
                events.append(WalEvent(lsn, end, "SWITCH", xid))
            elif every_record:
                events.append(WalEvent(lsn, end, "XLOG", xid))
        elif every_record:
            events.append(WalEvent(lsn, end, match["rmgr"], xid))
    return events


def dump_files(
    waldump: str, directory: Path, first: WalSegment, last: WalSegment, *, every_record: bool = False
) -> list[WalEvent]:
    """Run pg_waldump over first..last (files already in directory) and return the events."""
    env = dict(os.environ, TZ="UTC", LC_ALL="C")
    rmgrs = [] if every_record else ["--rmgr=Transaction", "--rmgr=XLOG"]
    cmd = [waldump, "--path", str(directory), *rmgrs, first.name, last.name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise PostgresError(f"{waldump} is not installed",
                            hint="install the PostgreSQL server package or set postgres.bindir") from None
    # pg_waldump exits non-zero at the first unreadable record, which is normal at the end of the
    # newest segment; the records before it are still right.
    return parse_events(proc.stdout, every_record=every_record)


class WalReader:
    """Fetches archived segments into a private temp dir and dumps them."""

    def __init__(self, fetch: object, waldump: str) -> None:
        # fetch(name, dest) restores one verified WAL file (archive.fetch bound to a repository).
        self._fetch = fetch
        self._waldump = waldump

    def events(self, segments: Sequence[WalSegment], *, every_record: bool = False) -> list[WalEvent]:
        if not segments:
            return []
        with tempfile.TemporaryDirectory(prefix="pgvault-waldump-") as tmp:
            for seg in segments:
                self._fetch(seg.name, Path(tmp) / seg.name)  # type: ignore[operator]
            return dump_files(self._waldump, Path(tmp), segments[0], segments[-1], every_record=every_record)
