"""Running pg_basebackup as a tar stream on stdout, and reading what it says about the backup."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime

from pgvault.errors import IntegrityError, PostgresError
from pgvault.pg.wal import Lsn
from pgvault.redaction import redact


def split_password(conninfo: str) -> tuple[str, str | None]:
    """Move a password out of the conninfo: it goes to PGPASSWORD, never into argv (ps shows argv)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(conninfo)
    password = params.pop("password", None)
    return make_conninfo(**{k: str(v) for k, v in params.items()}), (str(password) if password else None)


def start(
    conninfo: str, *, label: str, checkpoint: str, application_name: str, binary: str = "pg_basebackup"
) -> subprocess.Popen[bytes]:
    from psycopg.conninfo import make_conninfo

    safe_conninfo, password = split_password(conninfo)
    # A name of our own, so the watchdog can find this backup's walsender in pg_stat_activity.
    safe_conninfo = make_conninfo(safe_conninfo, application_name=application_name)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    cmd = [
        binary, "--pgdata=-", "--format=tar", "--wal-method=none",
        f"--checkpoint={checkpoint}", "--manifest-checksums=SHA256", f"--label={label}",
        "--no-password", f"--dbname={safe_conninfo}",
    ]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise PostgresError(f"{binary} not found (is the PostgreSQL client installed, postgres.bindir right?)",
                            hint="install the PostgreSQL client package (postgresql-client-15)") from None


def finish(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    rc = proc.wait()
    if rc != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        detail = redact(lines[-1] if lines else f"exit code {rc}")
        raise PostgresError(f"pg_basebackup failed: {detail}")


@dataclass(frozen=True)
class BackupLabel:
    start_lsn: Lsn
    start_wal: str
    checkpoint_lsn: Lsn
    timeline: int
    start_time: datetime | None


_LABEL_START = re.compile(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$", re.M)
_LABEL_CHECKPOINT = re.compile(r"^CHECKPOINT LOCATION: ([0-9A-F]+/[0-9A-F]+)$", re.M)
_LABEL_TIMELINE = re.compile(r"^START TIMELINE: (\d+)$", re.M)
_LABEL_TIME = re.compile(r"^START TIME: (.+)$", re.M)


def parse_label(data: bytes) -> BackupLabel:
    text = data.decode(errors="replace")
    start = _LABEL_START.search(text)
    checkpoint = _LABEL_CHECKPOINT.search(text)
    timeline = _LABEL_TIMELINE.search(text)
    if not (start and checkpoint and timeline):
        raise IntegrityError("the backup_label pg_basebackup sent is not one pgvault can read")
    started = _LABEL_TIME.search(text)
    start_time = None
    if started:
        try:
            start_time = datetime.strptime(started.group(1).strip(), "%Y-%m-%d %H:%M:%S %Z")
        except ValueError:
            start_time = None
    return BackupLabel(Lsn.parse(start.group(1)), start.group(2), Lsn.parse(checkpoint.group(1)),
                       int(timeline.group(1)), start_time)


@dataclass(frozen=True)
class WalRange:
    timeline: int
    start: Lsn
    end: Lsn


def manifest_wal_ranges(data: bytes) -> list[WalRange]:
    """The WAL a backup needs to become consistent, from PostgreSQL's own backup_manifest."""
    try:
        manifest = json.loads(data)
        return [WalRange(int(r["Timeline"]), Lsn.parse(r["Start-LSN"]), Lsn.parse(r["End-LSN"]))
                for r in manifest["WAL-Ranges"]]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the backup_manifest pg_basebackup sent has no readable WAL-Ranges") from None
