"""postgresql.auto.conf: the file pgvault writes server settings into (as ALTER SYSTEM would)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _keep_owner(path: Path, pgdata: Path) -> None:
    # When root writes the file, hand it to the data directory's owner or the server cannot read it.
    if os.geteuid() == 0:
        st = pgdata.stat()
        os.chown(path, st.st_uid, st.st_gid)


def read_auto_conf(pgdata: Path) -> dict[str, str]:
    """Setting name (lower case) -> raw value text, last one wins, as PostgreSQL reads it."""
    path = pgdata / "postgresql.auto.conf"
    result: dict[str, str] = {}
    if not path.exists():
        return result
    for line in path.read_text().splitlines():
        key = _setting_key(line)
        if key is not None:
            result[key] = line.split("=", 1)[1].strip() if "=" in line else ""
    return result




def _quote_setting(value: str) -> str:
    # Same quoting ALTER SYSTEM uses; every GUC type accepts a quoted value.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _setting_key(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = re.match(r"([A-Za-z_][A-Za-z0-9_.]*)\s*=?", stripped)
    return match.group(1).lower() if match else None


def set_auto_conf(pgdata: Path, settings: dict[str, str], *, remove: Iterable[str] = ()) -> None:
    """Set settings in pgdata/postgresql.auto.conf, replacing lines for the same names, keeping the rest."""
    for name in settings:
        if not _SETTING_NAME.match(name):
            raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
    wanted = {name.lower(): (name, value) for name, value in settings.items()}
    dropped = {name.lower() for name in remove}
    path = pgdata / "postgresql.auto.conf"
    old_lines = path.read_text().splitlines() if path.exists() else []
    new_lines: list[str] = []
    written: set[str] = set()
    for line in old_lines:
        key = _setting_key(line)
        if key in dropped and key not in wanted:
            continue
        if key is None or key not in wanted:
            new_lines.append(line)
        elif key not in written:
            # Replace in place so a reader of the file sees the setting where it was.
            name, value = wanted[key]
            new_lines.append(f"{name} = {_quote_setting(value)}")
            written.add(key)
    for key, (name, value) in wanted.items():
        if key not in written:
            new_lines.append(f"{name} = {_quote_setting(value)}")
    path.write_text("\n".join(new_lines) + "\n")
    path.chmod(0o600)
    _keep_owner(path, pgdata)
