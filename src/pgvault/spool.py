"""Spool directories of wal-push look-ahead and wal-fetch prefetch: outside PGDATA, per policy.

Both must be found by the per-segment fast path before the policy is loaded (that costs pydantic),
so their place derives from the policy file's path alone: $PGVAULT_SPOOL_DIR (default
/var/tmp/pgvault-spool), then `push/<hash>` per policy file, and `fetch/<hash>` per policy file
and data directory (two restores with one policy must not share prefetched segments). Standard
library only: the fast path imports this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys

# pathlib costs the wal-push fast path 2.5 ms of imports per segment: it uses the *_dir functions.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_ROOT = "/var/tmp/pgvault-spool"


def _root() -> str:
    return os.environ.get("PGVAULT_SPOOL_DIR") or DEFAULT_ROOT


def spool_root() -> Path:
    import pathlib

    return pathlib.Path(_root())


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def policy_digest(config_path: str | os.PathLike[str]) -> str:
    """SHA-256 of the policy file: what a spool's markers and worker stand for is the repository the
    policy named when they were made."""
    with open(config_path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def push_spool(config_path: str | os.PathLike[str]) -> Path:
    """Where wal-push records the segments its look-ahead put in the repository."""
    import pathlib

    return pathlib.Path(push_spool_dir(config_path))


def push_spool_dir(config_path: str | os.PathLike[str]) -> str:
    """push_spool, as a string, without importing pathlib."""
    return os.path.join(_root(), "push", _key(os.path.realpath(config_path)))


def fetch_spool(config_path: str | os.PathLike[str], pgdata: str | os.PathLike[str]) -> Path:
    """Where wal-fetch keeps prefetched segments for the recovery running in pgdata (restore_command's
    working directory)."""
    return spool_root() / "fetch" / _key(os.path.realpath(config_path), os.path.realpath(pgdata))


# ---- a spool's worker: one per spool, found by its lock; started detached --------------------------

def lock_holder(lock: str | os.PathLike[str]) -> int | None:
    """The pid of the worker holding lock (flock), 0 when held but the pid is unreadable, None when free."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").split("\n", 1)[0].strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)


def take_lock(lock: str | os.PathLike[str], detail: str = "") -> int | None:
    """The open, flocked lock file with our pid (and detail) in it, or None when another worker holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{detail}\n".encode() if detail else f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_detail(lock: str | os.PathLike[str]) -> str | None:
    """What take_lock wrote after the pid (e.g. the directory a worker serves), or None."""
    try:
        with open(lock, "rb") as handle:
            lines = handle.read(4096).decode(errors="replace").split("\n")
    except OSError:
        return None
    return lines[1] if len(lines) > 1 and lines[1] else None


def still_holds(lock: str | os.PathLike[str], fd: int) -> bool:
    """False once lock was removed or replaced under the worker holding fd (its spool went away)."""
    try:
        return os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def spawn_detached(args: list[str], log: str | os.PathLike[str]) -> None:
    """Start `python -m pgvault ARGS` in its own session, stdin from /dev/null, output appended to log.

    Its own session: the caller (archive_command, restore_command) is waited for by PostgreSQL, whose
    signals to the process group must not reach the worker. posix_spawn keeps this cheap for a fast
    path: no subprocess module, no fork of a big process.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.fspath(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    os.posix_spawn(sys.executable, [sys.executable, "-m", "pgvault", *args], dict(os.environ),
                   file_actions=actions, setsid=True)


def log_to(path: str | os.PathLike[str]) -> None:
    """Send the pgvault loggers (a worker's own lines and the storage's retry messages) to path."""
    import logging  # here, not at the top: the fast paths import this module

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("pgvault")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
