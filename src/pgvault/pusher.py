"""archive.background: a worker that keeps pushing `.ready` segments while PostgreSQL's archiver calls
wal-push for them one at a time (what pgBackRest calls archive-async), with the look-ahead's markers.

The inline look-ahead (pgvault.push_ahead) pushes its batch inside one archive_command call, and the
archiver waits for the whole batch. With archive.background the full path pushes only its own segment,
then makes sure a pusher runs for its pg_wal directory (`pgvault --config C wal-pusher --wal-dir D`,
started detached) and returns. The pusher looks at archive_status every POLL seconds and pushes the
`.ready` segments that have no marker, oldest first, at most archive.look_ahead marked or in flight
and archive.push_parallel at once; for each one the repository confirmed it writes the same marker
the inline look-ahead writes. While it pushes a segment, `.busy.<segment>` is in the spool.
PostgreSQL's call for a segment without a marker, while a pusher serves its pg_wal, waits for the
pusher to take it up and push it (push_ahead.await_pusher) instead of loading the CLI and pushing it
a second time; so with a pusher running every call is a fast one, as pgBackRest's foreground
archive-push only waits for its async process.

Guarantee 1 rests on the markers alone, as for the inline look-ahead: PostgreSQL hears "archived" only
from a call that pushed the segment itself or found a marker matching the file byte for byte. The
pusher never touches archive_status. It exits after IDLE_EXIT seconds with nothing to push, on SIGTERM,
when PostgreSQL stops (no postmaster.pid next to pg_wal), when the policy file changes, and when the
spool or pg_wal goes away. Spool files (next to the markers):

    pusher.lock             flock of the running pusher, with its pid and the pg_wal directory it serves
    pusher.log              when it started and stopped and why, and each push that failed
    .busy.<segment>         a segment being pushed right now
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from pgvault.push_ahead import (
    BUSY_PREFIX,
    IN_FLIGHT_BYTES,
    PUSHER_LOCK,
    archive_order,
    is_segment_name,
    marked,
    marker_bytes,
    prepare_spool,
    tidy,
    write_marker,
)
from pgvault.spool import (
    lock_detail,
    lock_holder,
    log_to,
    policy_digest,
    push_spool,
    spawn_detached,
    still_holds,
    take_lock,
)

LOG = "pusher.log"
POLL = 0.02  # seconds between looks at archive_status
CHECK_EVERY = 1.0  # seconds between checks of the policy file, postmaster.pid and the lock
IDLE_EXIT = 30.0  # seconds with nothing to push before the pusher exits (the next full path starts another)
FAILURE_BACKOFF = 5.0  # after a failed push, start no other for this long (PostgreSQL's own call reports it)
LOG_MAX = 1024 * 1024  # pusher.log is started afresh (the old one kept as pusher.log.1) beyond this


def choose(ready: Collection[str], marked: Collection[str], busy: Collection[str], *, ahead: int, free: int,
           skip: str = "", done: Collection[str] = ()) -> list[str]:
    """The segments to start pushing now, oldest first: `.ready` complete segments without a marker, not
    being pushed and not pushed before (done; nor skip, which the call that started the pusher pushed
    itself), so that at most `ahead` are marked or in flight and at most `free` are started."""
    if free <= 0 or not ready:
        return []
    order = sorted(ready, key=archive_order)
    waiting = sum(1 for name in order if name in marked) + len(busy)
    room = min(free, ahead - waiting)
    if room <= 0:
        return []
    candidates = (name for name in order if is_segment_name(name) and name != skip and name not in marked
                  and name not in busy and name not in done)
    return [name for name, _ in zip(candidates, range(room), strict=False)]


# ---- starting one -----------------------------------------------------------------------------------

def ensure_pusher(config: str | os.PathLike[str], wal_dir: str | os.PathLike[str], pushed: str) -> bool:
    """Make sure a pusher serves wal_dir; False when none can (the caller then looks ahead inline):
    no running PostgreSQL next to wal_dir (a file pushed by hand), a spool we cannot use, or a pusher
    already serving another pg_wal with this policy. pushed: the segment the caller pushed itself,
    which a new pusher leaves alone (it stays `.ready` until the caller exits)."""
    wal_dir = os.path.abspath(wal_dir)  # not resolved: postmaster.pid is next to the pg_wal PostgreSQL names
    if not os.path.exists(os.path.join(os.path.dirname(wal_dir), "postmaster.pid")):
        return False
    spool = push_spool(config)
    lock = spool / PUSHER_LOCK
    if lock_holder(lock) is not None:
        return lock_detail(lock) == wal_dir
    if not prepare_spool(os.fspath(spool)):
        return False
    spawn_detached(["--config", os.path.realpath(config), "wal-pusher", "--wal-dir", wal_dir, "--skip", pushed],
                   spool / LOG)
    return True


# ---- the pusher -------------------------------------------------------------------------------------

def run_pusher(config: Path, wal_dir: Path, skip: str = "") -> None:
    """Push `.ready` segments of wal_dir ahead of PostgreSQL's archiver until there is nothing to do.
    Returns at once when another pusher holds the spool's lock."""
    spool = push_spool(config)
    if not prepare_spool(os.fspath(spool)):
        return
    lock = spool / PUSHER_LOCK
    lock_fd = take_lock(lock, os.fspath(wal_dir))
    if lock_fd is None:
        return
    log = _logger(spool)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    os.chdir(spool)  # nothing of PGDATA's stays busy because of us
    try:
        _clear_busy(spool)
        from pgvault.archive import push
        from pgvault.catalog import Catalog
        from pgvault.config import load_policy
        from pgvault.repo import open_storage

        digest = policy_digest(config)
        policy = load_policy(config)
        if not policy.archive.background or policy.archive.look_ahead == 0:
            log("pusher not started: archive.background is off or archive.look_ahead is 0")
            return
        storage = open_storage(policy.repository)
        catalog = Catalog(storage, policy.cluster)
        info = catalog.require_cluster_info()
        real_wal_dir = os.path.realpath(wal_dir)
        level = policy.archive.compression_level

        def push_one(name: str) -> None:
            try:
                result = push(storage, catalog.layout, wal_dir / name, system_id=info.system_id,
                              segment_size=info.wal_segment_size, level=level)
                write_marker(os.fspath(spool), name, marker_bytes(name, result.raw_size, result.raw_sha256,
                                                                  real_wal_dir, digest, time.time(), result.identity))
            finally:
                _unbusy(spool, name)  # after the marker: a waiting call finds the marker, or goes the full path

        threads = max(1, min(policy.archive.push_parallel, IN_FLIGHT_BYTES // info.wal_segment_size))
        log(f"pusher started for {wal_dir}: up to {policy.archive.look_ahead} segments ahead, {threads} at once")
        why = _work(spool, wal_dir, push_one, stop, log, lambda: _still_valid(config, digest, lock, lock_fd, wal_dir),
                    ahead=policy.archive.look_ahead, threads=threads, skip=skip)
        log(f"pusher stopped: {why}")
    except Exception as exc:  # PostgreSQL's own calls still archive without us; say why we stopped
        log(f"pusher stopped: {_describe(exc)}")
    finally:
        _clear_busy(spool)
        os.close(lock_fd)


def _work(spool: Path, wal_dir: Path, push_one: Callable[[str], None], stop: threading.Event,
          log: Callable[[str], None], still_valid: Callable[[], str | None], *, ahead: int, threads: int,
          skip: str = "") -> str:
    """The pusher's loop; returns why it ended. Pushes still in flight finish (and mark) before it returns."""
    from concurrent.futures import Future, ThreadPoolExecutor

    status_dir = wal_dir / "archive_status"
    inflight: dict[str, Future[None]] = {}
    # Pushed and marked: never again while `.ready` (PostgreSQL's call takes the marker away a moment
    # before it renames `.ready`; a second push then would only leave a marker nobody asks for).
    pushed: set[str] = set()
    last_work = next_check = backoff_until = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pgvault-pusher") as pool:
        while not stop.is_set():
            now = time.monotonic()
            for name, future in list(inflight.items()):
                if future.done():
                    del inflight[name]
                    if (exc := future.exception()) is not None:
                        log(f"{name} not pushed: {_describe(exc)}")
                        backoff_until = now + FAILURE_BACKOFF
                    else:
                        pushed.add(name)
            checked = now >= next_check
            if checked:
                if (why := still_valid()) is not None:
                    return why
                next_check = now + CHECK_EVERY
            try:
                ready = {entry[: -len(".ready")] for entry in os.listdir(status_dir) if entry.endswith(".ready")}
            except OSError:
                return f"{status_dir} cannot be read"
            if checked:  # markers PostgreSQL will not ask for (it archived or removed those segments) go
                tidy(os.fspath(spool), ready, now=time.time())
                pushed &= ready
            chosen = [] if now < backoff_until else choose(ready, marked(os.fspath(spool)), inflight, ahead=ahead,
                                                             free=threads - len(inflight), skip=skip, done=pushed)
            for name in chosen:
                _busy(spool, name)
                inflight[name] = pool.submit(push_one, name)
            if inflight or chosen:
                last_work = now
            elif now - last_work > IDLE_EXIT:
                return f"nothing to push for {IDLE_EXIT:.0f} s"
            stop.wait(POLL)
    return "asked to stop"


def _still_valid(config: Path, digest: str, lock: Path, lock_fd: int, wal_dir: Path) -> str | None:
    """Why the pusher must stop now, or None."""
    if not still_holds(lock, lock_fd):
        return "its spool was removed"
    if not (wal_dir.parent / "postmaster.pid").exists():
        return "PostgreSQL stopped"
    try:
        if policy_digest(config) != digest:
            return "the policy file changed"
    except OSError as exc:
        return f"the policy file cannot be read: {exc.strerror}"
    return None


# ---- busy files, log ----------------------------------------------------------------------------------

def _busy(spool: Path, name: str) -> None:
    fd = os.open(spool / f"{BUSY_PREFIX}{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _unbusy(spool: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(spool / f"{BUSY_PREFIX}{name}")


def _clear_busy(spool: Path) -> None:
    """Busy files of an earlier pusher (killed): we hold the lock, so none is being pushed now."""
    with contextlib.suppress(OSError):
        for name in _busy_names(os.listdir(spool)):
            _unbusy(spool, name)


def _busy_names(entries: Iterable[str]) -> list[str]:
    return [entry[len(BUSY_PREFIX):] for entry in entries if entry.startswith(BUSY_PREFIX)]


def _describe(exc: BaseException) -> str:
    from pgvault.errors import PgvaultError
    from pgvault.redaction import redact

    return redact(exc.message if isinstance(exc, PgvaultError) else f"{type(exc).__name__}: {exc}")


def _logger(spool: Path) -> Callable[[str], None]:
    """One line per event to pusher.log; the storage's retry messages (logger pgvault.repo) go there too."""
    import logging

    from pgvault.redaction import redact

    path = spool / LOG
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_MAX:
            os.replace(path, spool / f"{LOG}.1")
    log_to(path)
    logger = logging.getLogger("pgvault")
    return lambda message: logger.info(redact(message))
