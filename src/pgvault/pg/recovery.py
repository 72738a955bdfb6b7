"""Recovery settings: recovery.signal plus restore_command and the recovery_target_* settings."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from pgvault.pg.autoconf import set_auto_conf
from pgvault.targets import RecoveryTarget

# Settings a previous restore or the backed-up cluster may have left that would change this recovery.
_STALE = (
    "restore_command", "recovery_target", "recovery_target_time", "recovery_target_lsn",
    "recovery_target_xid", "recovery_target_name", "recovery_target_inclusive",
    "recovery_target_timeline", "recovery_target_action", "recovery_end_command",
)


def self_command() -> list[str]:
    """How PostgreSQL should invoke this pgvault: the console script beside the running interpreter.

    The directory is resolved so a symlinked venv is named by its real path, which the database user
    can reach even when the symlink sits in a directory it cannot enter.
    """
    beside = Path(sys.executable).parent.resolve() / "pgvault"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    script = Path(sys.argv[0])
    if script.name == "pgvault" and script.is_file():
        return [str(script.resolve())]
    return [sys.executable, "-m", "pgvault"]


_FETCH_ARGS = ' wal-fetch "%f" "%p"'


def restore_command(config_path: Path) -> str:
    parts = [*self_command(), "--config", str(config_path)]
    # PostgreSQL substitutes %f and %p; the rest is quoted for the shell it runs the command with.
    return " ".join(shlex.quote(p) for p in parts) + _FETCH_ARGS


def recovery_end_command(restore_cmd: str) -> str | None:
    """The recovery_end_command that goes with a restore_command made by restore_command(): it stops
    wal-fetch's prefetch worker and removes its spool (recovery_end_command runs in the data
    directory too, so it finds the same spool). None for any other restore_command."""
    if not restore_cmd.endswith(_FETCH_ARGS):
        return None
    return restore_cmd.removesuffix(_FETCH_ARGS) + " wal-prefetch --clean"


def recovery_settings(target: RecoveryTarget, command: str, *, archive_off: bool) -> dict[str, str]:
    settings = {"restore_command": command}
    end_command = recovery_end_command(command)
    if end_command is not None:
        settings["recovery_end_command"] = end_command
    match target.kind:
        case "time":
            assert target.time is not None
            settings["recovery_target_time"] = target.time.isoformat(sep=" ")
        case "lsn":
            settings["recovery_target_lsn"] = str(target.lsn)
        case "xid":
            settings["recovery_target_xid"] = str(target.xid)
        case "name":
            assert target.name is not None
            settings["recovery_target_name"] = target.name
        case "immediate":
            settings["recovery_target"] = "immediate"
    if target.kind != "end":
        settings["recovery_target_action"] = target.action
    if target.kind in ("time", "lsn", "xid"):
        settings["recovery_target_inclusive"] = "on" if target.inclusive else "off"
    settings["recovery_target_timeline"] = str(target.timeline)
    if archive_off:
        settings["archive_mode"] = "off"
    return settings


def write_recovery(pgdata: Path, settings: dict[str, str]) -> None:
    set_auto_conf(pgdata, settings, remove=_STALE)
    signal = pgdata / "recovery.signal"
    signal.touch()
    if os.geteuid() == 0:
        st = pgdata.stat()
        os.chown(signal, st.st_uid, st.st_gid)
    for stale in ("standby.signal",):
        (pgdata / stale).unlink(missing_ok=True)
