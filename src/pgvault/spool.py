"""Spool directories of wal-push look-ahead and wal-fetch prefetch: outside PGDATA, per policy.

Both must be found by the per-segment fast path before the policy is loaded (that costs pydantic),
so their place derives from the policy file's path alone: $PGVAULT_SPOOL_DIR (default
/var/tmp/pgvault-spool), then `push/<hash>` per policy file, and `fetch/<hash>` per policy file
and data directory (two restores with one policy must not share prefetched segments). Standard
library only: the fast path imports this module.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_ROOT = "/var/tmp/pgvault-spool"


def spool_root() -> Path:
    return Path(os.environ.get("PGVAULT_SPOOL_DIR") or DEFAULT_ROOT)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def policy_digest(config_path: str | os.PathLike[str]) -> str:
    """SHA-256 of the policy file: what a spool's markers and worker stand for is the repository the
    policy named when they were made."""
    with open(config_path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def push_spool(config_path: str | os.PathLike[str]) -> Path:
    """Where wal-push records the segments its look-ahead put in the repository."""
    return spool_root() / "push" / _key(os.path.realpath(config_path))


def fetch_spool(config_path: str | os.PathLike[str], pgdata: str | os.PathLike[str]) -> Path:
    """Where wal-fetch keeps prefetched segments for the recovery running in pgdata (restore_command's
    working directory)."""
    return spool_root() / "fetch" / _key(os.path.realpath(config_path), os.path.realpath(pgdata))
