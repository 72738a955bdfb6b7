"""wal-push look-ahead: one archive_command call also pushes the next `.ready` segments, and
PostgreSQL's later call for each of them is answered from a marker, without click, pydantic or boto3.

PostgreSQL runs archive_command once per segment and waits for it; when WAL is written faster than
one call takes, `.ready` segments queue up. The full path (`wal_push` in pgvault.cli) pushes the
segment it was given and then, in parallel, up to `archive.look_ahead` of the queued ones in
PostgreSQL's own archive order, each with every check archive.push makes. For each one the
repository confirmed durable it writes a marker into the push spool (pgvault.spool): the segment's
size and SHA-256 as pushed, the pg_wal directory it came from and the SHA-256 of the policy file.
When PostgreSQL then calls for that segment, fast_push answers 0 only if the marker is ours, the
segment is still `.ready` in that directory, the policy is unchanged and the file has exactly that
size and SHA-256; anything else goes to the full path, which decides as it always did.

What this module never does: create, rename or delete anything in archive_status (PostgreSQL renames
`.ready` to `.done` itself after our exit 0), or fail the call for the segment it was asked for because
of the look-ahead or the spool. Deleting a marker is always safe (it only costs a full-path call);
writing one is done only after the repository confirmed the segment durable (guarantee 1).

Importing this module and calling fast_push needs the standard library only (the console script's
per-call budget); the full path's pieces import pgvault.archive inside the function that pushes.
"""

from __future__ import annotations

import json
import os
import time

from pgvault.spool import lock_detail, lock_holder, policy_digest, push_spool_dir

TYPE_CHECKING = False  # typing costs the fast path an import; this constant is all linters need
if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterable, Sequence
    from pathlib import Path

    from pgvault.repo.base import Storage
    from pgvault.repo.layout import Layout

MARKER_VERSION = 1
MARKER_MAX_AGE = 24 * 3600  # seconds; older markers are removed by the full path
TMP_PREFIX = ".tmp."
TMP_MAX_AGE = 3600  # a marker being written for longer than this was left by a killed writer
TIDY_BUDGET = 256  # spool entries looked at per full-path call (the spool normally holds <= look_ahead)
# archive.push holds a segment and its compressed copy in memory: with large segments (initdb
# --wal-segsize up to 1 GiB) fewer threads, so the look-ahead stays within this many segment bytes.
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# archive.background (pgvault.pusher): the pusher's lock, and `.busy.<segment>` while it pushes one.
PUSHER_LOCK = "pusher.lock"
BUSY_PREFIX = ".busy."
BUSY_WAIT = 60.0  # the longest PostgreSQL's call waits for the pusher to finish its segment (seconds)
PICKUP_WAIT = 0.5  # ... and for the pusher to start on it
_HEX = frozenset("0123456789ABCDEF")
_HISTORY_SUFFIX = ".history"


# ---- names and order (pure) -------------------------------------------------------------------------

def is_segment_name(name: str) -> bool:
    """A complete WAL segment's name (24 upper-case hex digits): the only files the look-ahead pushes."""
    return len(name) == 24 and all(c in _HEX for c in name)


def _is_history_name(name: str) -> bool:
    # IsTLHistoryFileName in access/xlog_internal.h: 8 hex digits + ".history".
    return len(name) == 16 and name.endswith(_HISTORY_SUFFIX) and all(c in _HEX for c in name[:8])


def archive_order(name: str) -> tuple[int, str]:
    """The order PostgreSQL's archiver picks `.ready` files in (pgarch.c, ready_file_comparator):
    timeline history files first, then the lowest name (strcmp; the names are ASCII)."""
    return (0 if _is_history_name(name) else 1, name)


def select_look_ahead(ready: Iterable[str], current: str, limit: int, skip: Container[str] = ()) -> list[str]:
    """The segments one call for `current` pushes besides it: `.ready` complete segments that come after
    current in archive order and have no marker yet (skip), oldest first, at most limit.

    History, .partial and .backup files are left to PostgreSQL's own calls: they are rare and small,
    and a .partial may legitimately be replaced, which a marker must never stand for.
    """
    if limit <= 0:
        return []
    after = archive_order(current)
    chosen = sorted(name for name in set(ready)
                    if is_segment_name(name) and name not in skip and archive_order(name) > after)
    return chosen[:limit]


# ---- markers ----------------------------------------------------------------------------------------

def marker_bytes(name: str, size: int, raw_sha256: str, wal_dir: str, policy_sha256: str,
                 pushed_at: float, identity: Sequence[int] | None = None) -> bytes:
    """identity: archive.file_identity of the file as its bytes were read, if it did not change meanwhile."""
    marker: dict[str, object] = {"v": MARKER_VERSION, "name": name, "size": size, "raw_sha256": raw_sha256,
                                 "wal_dir": wal_dir, "policy_sha256": policy_sha256, "pushed_at": pushed_at}
    if identity is not None:
        marker["identity"] = list(identity)
    return json.dumps(marker).encode()


def parse_marker(data: bytes, name: str) -> dict[str, object] | None:
    """The marker's fields if it is a well-formed marker for name, else None."""
    try:
        marker = json.loads(data)
    except ValueError:
        return None
    if not isinstance(marker, dict) or marker.get("v") != MARKER_VERSION or marker.get("name") != name:
        return None
    size, digest = marker.get("size"), marker.get("raw_sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return None
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    if not isinstance(marker.get("wal_dir"), str) or not isinstance(marker.get("policy_sha256"), str):
        return None
    identity = marker.get("identity")
    if identity is not None and not (isinstance(identity, list) and len(identity) == 5
                                     and all(type(v) is int for v in identity)):
        return None
    return marker


def _private(st: os.stat_result) -> bool:
    # Only our own user may have written it: the spool's default place is under /var/tmp.
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def read_marker(spool: str, name: str) -> dict[str, object] | None:
    """The marker for name if there is one, owned by us and private (in a private directory)."""
    try:
        if not _private(os.stat(spool)):
            return None
        fd = os.open(os.path.join(spool, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not _private(st) or (st.st_mode & 0o170000) != 0o100000 or st.st_size > 4096:
            return None
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_marker(data, name)


def write_marker(spool: str, name: str, data: bytes) -> None:
    """Publish a marker atomically: written and fsynced under a temporary name, then renamed."""
    tmp = os.path.join(spool, f"{TMP_PREFIX}{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # No fsync of the directory: a marker lost in a crash only costs PostgreSQL's next call the
        # full path; the fsync above makes sure a marker that survives is complete.
        os.replace(tmp, os.path.join(spool, name))
    except BaseException:
        _unlink(tmp)
        raise


def forget(spool: str, name: str) -> None:
    """Remove name's marker, if any (never an error: removing a marker is always safe)."""
    _unlink(os.path.join(spool, name))


def _unlink(path: str) -> bool:
    # Not contextlib.suppress: importing contextlib costs the fast path more than this does.
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


# ---- the fast path ----------------------------------------------------------------------------------

def fast_push(config: str, args: list[str]) -> int | None:
    """archive_command for a segment an earlier call's look-ahead pushed: 0 when certain, else None."""
    if len(args) != 1:
        return None
    path = args[0]
    wal_dir, name = os.path.split(path)
    if not is_segment_name(name):
        return None
    spool = push_spool_dir(config)
    marker = read_marker(spool, name)
    if marker is None and await_pusher(spool, name, wal_dir or "."):
        marker = read_marker(spool, name)
    if marker is None or not _matches(marker, config, path, wal_dir or ".", name):
        return None
    forget(spool, name)
    return 0


def await_pusher(spool: str, name: str, wal_dir: str) -> bool:
    """Wait while the background pusher (pgvault.pusher) serving wal_dir pushes name: True when it did
    (its marker may be there now), False when no pusher takes it (the full path then pushes it).

    A segment not yet picked up gets PICKUP_WAIT for the pusher to start on it (it looks every 20 ms);
    one being pushed (`.busy.<name>`) is waited for up to BUSY_WAIT. The pusher removes the busy file
    after writing the marker, or after failing. A pusher that is gone (killed) is not waited for.
    """
    if not os.path.exists(os.path.join(wal_dir, "archive_status", name + ".ready")):
        return False  # not PostgreSQL asking for a segment it has queued: the pusher will not push it
    lock = os.path.join(spool, PUSHER_LOCK)
    if lock_holder(lock) is None or lock_detail(lock) != os.path.abspath(wal_dir):
        return False
    busy = os.path.join(spool, BUSY_PREFIX + name)
    marker = os.path.join(spool, name)
    start = time.monotonic()
    next_check, delay = start + 0.5, 0.001
    while not os.path.exists(busy):
        if os.path.exists(marker):
            return True
        if time.monotonic() - start > PICKUP_WAIT:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.005)
    start = time.monotonic()
    while os.path.exists(busy):
        now = time.monotonic()
        if now - start > BUSY_WAIT:
            break
        if now >= next_check:
            if lock_holder(lock) is None:
                break
            next_check = now + 0.5
        time.sleep(delay)
        delay = min(2 * delay, 0.01)
    return True


def _matches(marker: dict[str, object], config: str, path: str, wal_dir: str, name: str) -> bool:
    # Cheapest refusals first; the file's SHA-256 (16 MiB) last.
    if marker["wal_dir"] != os.path.realpath(wal_dir):
        return False
    if not os.path.exists(os.path.join(wal_dir, "archive_status", name + ".ready")):
        return False  # not PostgreSQL asking for a segment it has queued: let the full path answer
    if marker["policy_sha256"] != policy_digest(config):
        return False
    with open(path, "rb", buffering=0) as handle:
        st = os.fstat(handle.fileno())
        if st.st_size != marker["size"]:
            return False
        # The very file whose bytes were pushed, unchanged since (any write moves mtime and ctime; another
        # file put in its place has another inode): its content is the pushed content, no re-hash needed.
        # Otherwise (a chmod or a hard link also moves ctime) the content decides.
        if marker.get("identity") == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
            return True
        import hashlib

        return hashlib.file_digest(handle, "sha256").hexdigest() == marker["raw_sha256"]


# ---- the full path's look-ahead -----------------------------------------------------------------------

def prepare_spool(spool: str) -> bool:
    """Create the spool 0700 (each missing level), and say whether it is ours alone and writable."""
    missing = []
    probe = spool
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    try:
        for directory in reversed(missing):
            try:  # noqa: SIM105 (no contextlib in this module, see _unlink)
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        st = os.stat(spool)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(spool, 0o700)  # ours but opened up (by hand?): the fast path trusts only a private one
            st = os.stat(spool)
        return _private(st) and os.access(spool, os.W_OK | os.X_OK)
    except OSError:
        return False


def tidy(spool: str, ready: Container[str], *, now: float, budget: int = TIDY_BUDGET) -> int:
    """Remove markers of segments no longer `.ready` (PostgreSQL archived them through the full path,
    or removed them), markers older than MARKER_MAX_AGE, and stale temporary files. Looks at no more
    than budget entries. Returns how many it removed."""
    removed = 0
    try:
        entries = os.scandir(spool)
    except OSError:
        return 0
    with entries:
        for seen, entry in enumerate(entries):
            if seen >= budget:
                break
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if entry.name.startswith(TMP_PREFIX):
                stale = age > TMP_MAX_AGE
            elif is_segment_name(entry.name):
                stale = age > MARKER_MAX_AGE or entry.name not in ready
            else:
                continue  # not ours to judge
            if stale and _unlink(entry.path):
                removed += 1
    return removed


def marked(spool: str) -> set[str]:
    """The segments the spool holds markers for."""
    try:
        return {name for name in os.listdir(spool) if is_segment_name(name)}
    except OSError:
        return set()


def push_ahead(
    storage: Storage, layout: Layout, current: Path, *, policy_path: str | os.PathLike[str], policy_sha256: str,
    system_id: str, segment_size: int, level: int, limit: int, parallel: int,
    report: Callable[[str], None] = lambda message: None,
) -> tuple[list[str], dict[str, str]]:
    """After `current` was pushed: tidy the spool, then push up to limit other `.ready` segments with
    up to parallel threads and write a marker for each one the repository confirmed.

    Never raises: the call for `current` already succeeded, and nothing here may change that. Returns
    (the names pushed and marked, {name: why} of those that failed); report gets one line per event.
    """
    try:
        return _push_ahead(storage, layout, current, policy_path, policy_sha256, system_id, segment_size,
                           level, limit, parallel, report)
    except Exception as exc:  # a bug or an unforeseen OS error must not fail archiving of `current`
        report(f"look-ahead: stopped: {type(exc).__name__}: {exc}")
        return [], {}


def _push_ahead(storage: Storage, layout: Layout, current: Path, policy_path: str | os.PathLike[str],
                policy_sha256: str, system_id: str, segment_size: int, level: int, limit: int, parallel: int,
                report: Callable[[str], None]) -> tuple[list[str], dict[str, str]]:
    wal_dir = current.parent
    if not policy_sha256:
        return [], {}
    try:
        status = os.listdir(wal_dir / "archive_status")
    except OSError:
        return [], {}  # not a pg_wal directory (a copy pushed by hand): nothing queued to look at
    ready = {entry[: -len(".ready")] for entry in status if entry.endswith(".ready")}
    spool = push_spool_dir(policy_path)
    if not os.path.isdir(spool) and limit <= 0:
        return [], {}
    if not prepare_spool(spool):
        report(f"look-ahead: spool {spool} cannot be created or written (or is not private); skipped")
        return [], {}
    removed = tidy(spool, ready, now=time.time())
    if removed:
        report(f"look-ahead: removed {removed} stale marker(s)")
    chosen = select_look_ahead(ready, current.name, limit, skip=marked(spool))
    if not chosen:
        return [], {}

    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pgvault.archive import push
    from pgvault.errors import PgvaultError

    real_wal_dir = os.path.realpath(wal_dir)
    failed: dict[str, str] = {}
    pushed: list[str] = []
    stop = threading.Event()  # after one failure start no more: a failing store would only slow this call

    def one(name: str) -> None:
        if stop.is_set():
            return
        try:
            result = push(storage, layout, wal_dir / name, system_id=system_id, segment_size=segment_size,
                          level=level)
            write_marker(spool, name, marker_bytes(name, result.raw_size, result.raw_sha256, real_wal_dir,
                                                   policy_sha256, time.time(), result.identity))
        except Exception as exc:
            stop.set()
            failed[name] = exc.message if isinstance(exc, PgvaultError) else f"{type(exc).__name__}: {exc}"
            return
        pushed.append(name)

    threads = max(1, min(parallel, len(chosen), IN_FLIGHT_BYTES // segment_size))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pgvault-push") as pool:
        list(pool.map(one, chosen))
    for name in sorted(pushed):
        report(f"look-ahead: pushed {name}")
    for name, why in sorted(failed.items()):
        report(f"look-ahead: {name} not pushed: {why}")
    return sorted(pushed), failed
