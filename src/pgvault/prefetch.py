"""wal-fetch prefetch: the next WAL segments fetched ahead, in parallel, into a spool outside PGDATA.

PostgreSQL runs restore_command once per file, one after the other, and waits for each. A full
`pgvault wal-fetch` pays every time for an interpreter, click, the policy (pydantic), a storage
client (boto3) and a round trip, while replaying a 16 MiB segment takes a fraction of that. So once
a full fetch of segment X succeeded, a detached worker fetches X+1, X+2, ... on X's timeline
(several at once) into the spool: each streamed to a temporary name, decompressed, checked against
the object's SHA-256 metadata, fsynced, given a sidecar with its size and SHA-256, and renamed into
place. The next call finds its segment there: fast_fetch checks size and SHA-256 again and moves it
to where PostgreSQL asked.

The spool (pgvault.spool.fetch_spool: one per policy file and data directory) holds:

    lock                    flock of the running worker (one per spool), with its pid
    want                    the segment PostgreSQL was given last; the window is the `prefetch` after it
    <segment>               a prefetched segment, complete and fsynced
    <segment>.sum           its sidecar: "<size> <sha256>" of the decompressed bytes
    .<segment>.tmp          a segment being fetched
    .<segment>.take.<pid>   a segment a fast path is handing over to PostgreSQL
    policy                  SHA-256 of the policy file the worker loaded
    .ask.<pid>, .answer.<pid>  a fast path's question "is this file archived?" and the worker's answer
    worker.log              what an operator should know (window restarts, errors, rejections)
    fetched, served         one line per segment prefetched / handed over from the spool

The segment handed over last stays (hard-linked) while it is `want`: a recovery re-reads the
segment it ends in. The fast path answers 0, or 1 ("not in the archive") only when the running
worker, asked just then, looked in the repository and did not find the file; anything else goes to
the full path, so "not in the archive" and failures (255) keep their meaning. The spool goes away when
recovery ends (restore sets recovery_end_command to `wal-prefetch --clean`); its segments also go
when the worker has been idle for a minute or is stopped (SIGTERM), or ten minutes after a killed
worker's last activity; what is left goes a day after it was last touched.

This module is imported by the console script's fast path (pgvault.entry): at module level it uses
the standard library only; the worker imports the rest inside its functions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from pgvault.spool import (
    fetch_spool,
    lock_holder,
    log_to,
    policy_digest,
    spawn_detached,
    spool_root,
    still_holds,
    take_lock,
)

# Not typing.TYPE_CHECKING: importing typing (and dataclasses, json) would cost the fast path more than
# its own work; type checkers treat this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping
    from typing import Any

    from pgvault.archive import FetchedWal
    from pgvault.repo.base import Storage
    from pgvault.repo.layout import Layout

LOCK = "lock"
WANT = "want"
LOG = "worker.log"
FETCHED = "fetched"
SERVED = "served"
SIDECAR = ".sum"
TMP = ".tmp"
TAKE = ".take."
ASK = ".ask."  # .ask.<pid>: a fast path's question to the worker (a WAL file name)
ANSWER = ".answer."  # .answer.<pid>: "absent <name>" or "present <name>"
POLICY = "policy"  # SHA-256 of the policy file the worker loaded
ABSENT = "absent"
PRESENT = "present"

POLL = 0.02  # how often an idle or waiting worker looks at `want` (seconds)
IDLE_EXIT = 60.0  # a worker nobody asked anything of for this long drops its segments and exits
INFLIGHT_WAIT = 30.0  # the longest a fast path waits for a segment the worker is fetching right now
INFLIGHT_STALL = 5.0  # ... or for one whose temporary file stopped growing
ASK_WAIT = 10.0  # the longest a fast path waits for the worker's answer (a HEAD request, retried)
STALE_SPOOL_AGE = 24 * 3600.0  # spools untouched this long are removed by any full wal-fetch
STALE_SEGMENTS_AGE = 600.0  # ... and their segments after this long, if no worker runs for them
STOP_WAIT = 5.0  # how long --clean waits for a worker it asked to stop
_HEX = frozenset("0123456789ABCDEF")
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024


def is_segment_name(name: str) -> bool:
    return len(name) == 24 and set(name) <= _HEX


# ---- the window: pure functions ------------------------------------------------------------------


def segment_after(name: str, steps: int, segment_size: int) -> str:
    """The segment `steps` after name on name's timeline."""
    per_log = 0x100000000 // segment_size
    number = int(name[8:16], 16) * per_log + int(name[16:24], 16) + steps
    return f"{name[:8]}{number // per_log:08X}{number % per_log:08X}"


def window(want: str, count: int, segment_size: int) -> list[str]:
    """The `count` segments after want, on want's timeline, nearest first."""
    return [segment_after(want, step, segment_size) for step in range(1, count + 1)]


def at_or_after(name: str, mark: str) -> bool:
    """Whether name is mark or a later segment of mark's timeline."""
    return name[:8] == mark[:8] and name[8:] >= mark[8:]


class Plan:
    """What the worker does next (a plain class: see TYPE_CHECKING above for why no dataclass)."""

    __slots__ = ("drop", "start")

    def __init__(self, drop: tuple[str, ...], start: tuple[str, ...]) -> None:
        self.drop = drop  # spooled segments nobody will ask for: older, another timeline, out of the window
        self.start = start  # segments to begin fetching now, nearest first

    def __repr__(self) -> str:
        return f"Plan(drop={self.drop!r}, start={self.start!r})"


def plan(want: str, spooled: Mapping[str, int], fetching: Collection[str], stop_at: str | None, *, count: int,
         parallel: int, max_bytes: int, segment_size: int, handing_over: Collection[int] = ()) -> Plan:
    """What the worker does next, given what PostgreSQL was given last (want) and what the spool holds.

    spooled maps spooled segments to their sizes; fetching are the segments being fetched (each
    reserves a whole segment, the most its temporary file grows to); handing_over are the sizes of
    segments fast paths are moving out of the spool right now; stop_at is the first segment the
    repository did not have (or failed to give), beyond which nothing is fetched. The spool never
    holds more than count segments nor more than max_bytes, temporary files included. The segment
    equal to want is kept: a fast path may be about to take it.
    """
    ahead = window(want, count, segment_size)
    wanted = set(ahead)
    drop = tuple(sorted(name for name in spooled if name not in wanted and name != want))
    used = len(spooled) - len(drop) + len(fetching) + len(handing_over)
    used_bytes = (sum(size for name, size in spooled.items() if name not in drop) + len(fetching) * segment_size
                  + sum(handing_over))
    start: list[str] = []
    for name in ahead:
        if name in spooled or name in fetching:
            continue
        if stop_at is not None and at_or_after(name, stop_at):
            break
        if len(fetching) + len(start) >= parallel or used + 1 > count or used_bytes + segment_size > max_bytes:
            break
        start.append(name)
        used += 1
        used_bytes += segment_size
    return Plan(drop, tuple(start))


# ---- the spool's files ---------------------------------------------------------------------------


def _make_dirs(spool: Path) -> None:
    """The spool and its parents, each private to the user PostgreSQL runs restore_command as."""
    missing: list[Path] = []
    probe = spool
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


def note(spool: Path, message: str) -> None:
    """A line for worker.log: what an operator reads in the server log when recovery ends."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError):
        _append(spool / LOG, f"{stamp} pid {os.getpid()}: {message}")


def read_want(spool: Path) -> str | None:
    try:
        name = (spool / WANT).read_text().strip()
    except OSError:
        return None
    return name if is_segment_name(name) else None


def set_want(spool: Path, name: str) -> None:
    _write_atomically(spool / WANT, name + "\n")


def scan(spool: Path, segment_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[dict[str, int], list[int]]:
    """Complete spooled segments (those with their sidecar) and their sizes; and the sizes of those
    being handed over by a fast path.

    What the directory listing shows counts, even if it is gone by the time its size is asked: a fast
    path may have renamed it to hand it over in between, and then neither name would count (the
    listing is one snapshot, the sizes are not). A size no longer known is a whole segment's.
    """
    found: dict[str, int] = {}
    taken: list[int] = []
    try:
        entries = list(os.scandir(spool))
    except FileNotFoundError:
        return found, taken
    names = {entry.name for entry in entries}
    for entry in entries:
        if is_segment_name(entry.name) and entry.name + SIDECAR in names:
            found[entry.name] = _size(entry, segment_size)
        elif entry.name.startswith(".") and TAKE in entry.name:
            taken.append(_size(entry, segment_size))
    return found, taken


def _size(entry: os.DirEntry[str], otherwise: int) -> int:
    try:
        return entry.stat().st_size
    except FileNotFoundError:
        return otherwise


def spooled_segments(spool: Path) -> dict[str, int]:
    return scan(spool)[0]


def _remove(spool: Path, name: str) -> None:
    # Data before sidecar: a segment is never present without the sidecar that vouches for it.
    for path in (spool / name, spool / (name + SIDECAR)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_segments(spool: Path) -> None:
    for name in spooled_segments(spool):
        _remove(spool, name)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


# ---- the worker's lock ---------------------------------------------------------------------------


def _holder(spool: Path) -> int | None:
    """The pid of the worker holding the spool's lock, or None if no worker runs."""
    return lock_holder(spool / LOCK)


def ensure_worker(config: str | os.PathLike[str], pgdata: str | os.PathLike[str]) -> bool:
    """Start the spool's worker unless one runs; True if one was started.

    The worker is `pgvault --config C wal-prefetch --worker --pgdata D`, detached in its own session
    (PostgreSQL waits only for restore_command, and signals to its process group must not reach the
    worker; see spool.spawn_detached). Two callers racing both spawn; the second worker finds the
    lock taken and exits.
    """
    spool = fetch_spool(config, pgdata)
    if _holder(spool) is not None:
        return False
    _make_dirs(spool)
    spawn_detached(["--config", os.path.realpath(config), "wal-prefetch", "--worker", "--pgdata",
                    os.path.realpath(pgdata)], spool / LOG)
    return True


# ---- the fast path -------------------------------------------------------------------------------


def fast_fetch(config: str, args: list[str]) -> int | None:
    """restore_command's answer from the spool: 0 once the segment is in place, 1 when the running worker
    just found the file not archived, None to let the full path answer.

    Standard library only. A spooled copy whose size or SHA-256 does not match its sidecar is deleted
    and never handed over. "Not archived" (1) ends recovery, so it is never answered from what the
    spool remembers: only from a fresh look the worker takes at the repository when asked (_ask).
    """
    if len(args) != 2:
        return None  # bad arguments: the full path says what is wrong
    name, dest = args
    pgdata = os.getcwd()
    spool = fetch_spool(config, pgdata)
    if not is_segment_name(name):
        return 1 if is_history_name(name) and _ask(spool, config, name) == ABSENT else None
    data = spool / name
    if not data.exists() and not _await_inflight(spool, name):
        return 1 if _ask(spool, config, name) == ABSENT else None
    # `want` first: the worker never drops the segment equal to it, and starts on the next one now.
    set_want(spool, name)
    taken = spool / f".{name}{TAKE}{os.getpid()}"
    try:
        os.rename(data, taken)
    except OSError:
        return None
    kept = False
    try:
        if not _matches_sidecar(taken, spool / (name + SIDECAR)):
            note(spool, f"{name}: the prefetched copy does not match its SHA-256; deleted it, the full wal-fetch "
                 "reads the repository instead")
            return None
        _hand_over(taken, Path(dest))
        # Kept while it is `want`: recovery that ends in this segment reads it once more (to start the
        # new timeline with it), and then the spool answers again. The next segment asked drops it.
        os.rename(taken, data)
        kept = True
    finally:
        if not kept:
            for leftover in (taken, spool / (name + SIDECAR)):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    with contextlib.suppress(OSError):
        _append(spool / SERVED, name)
    with contextlib.suppress(OSError):
        ensure_worker(config, pgdata)  # keep the window full (the worker may have exited idle)
    return 0


def is_history_name(name: str) -> bool:
    return len(name) == 16 and name.endswith(".history") and set(name[:8]) <= _HEX


def _policy_sha256(config: str | os.PathLike[str]) -> str | None:
    try:
        return policy_digest(config)
    except OSError:
        return None


def _ask(spool: Path, config: str, name: str) -> str | None:
    """Whether `name` is in the repository, asked of the spool's worker, which looks now (ABSENT, PRESENT),
    or None: no worker, a worker started with another version of the policy, or no answer in time.

    The question is a file `.ask.<pid>` holding the name; the answer `.answer.<pid>`. A worker that
    already loaded the policy and the storage client answers in milliseconds where a full wal-fetch
    spends a second's worth of imports; PostgreSQL asks "is there a newer timeline?" several times
    in every recovery, and once for the segment after the end of the archive.
    """
    if _holder(spool) is None:
        return None
    policy = _policy_sha256(config)
    try:
        started_with = (spool / POLICY).read_text().strip()
    except OSError:
        return None
    if policy is None or policy != started_with:
        return None  # the worker would answer for the repository of the policy as it was
    pid = os.getpid()
    question, answer = spool / f"{ASK}{pid}", spool / f"{ANSWER}{pid}"
    try:
        _write_atomically(question, name + "\n")
        deadline = time.monotonic() + ASK_WAIT
        while time.monotonic() < deadline:
            try:
                text = answer.read_text().strip()
            except FileNotFoundError:
                if _holder(spool) is None:
                    return None
                time.sleep(0.002)
                continue
            said, _, about = text.partition(" ")
            return said if about == name and said in (ABSENT, PRESENT) else None
        return None
    except OSError:
        return None
    finally:
        for leftover in (question, answer):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _await_inflight(spool: Path, name: str) -> bool:
    """Wait for a segment the worker is fetching now: that beats a second fetch by a full wal-fetch."""
    data, tmp = spool / name, spool / f".{name}{TMP}"
    started = progressed = time.monotonic()
    last_size = -1
    while True:
        if data.exists():
            return True
        try:
            size = os.stat(tmp).st_size
        except FileNotFoundError:
            return data.exists()  # renamed into place just now, or the fetch failed
        now = time.monotonic()
        if size != last_size:
            last_size, progressed = size, now
        if now - progressed > INFLIGHT_STALL or now - started > INFLIGHT_WAIT:
            return False
        time.sleep(0.002)


def _matches_sidecar(path: Path, sidecar: Path) -> bool:
    try:
        size_text, sha256 = sidecar.read_text().split()
        size = int(size_text)
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != size:
                return False
            return hashlib.file_digest(handle, "sha256").hexdigest() == sha256
    except (OSError, ValueError):
        return False


def _hand_over(path: Path, dest: Path) -> None:
    """Put a checked segment at dest, path staying where it is: a hard link on one file system, else a
    copy that is fsynced first. Either way dest appears whole or not at all."""
    tmp = dest.with_name(f".{dest.name}.pgvault-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
        os.replace(tmp, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# ---- the full path's part ------------------------------------------------------------------------


def after_full_fetch(config: str | os.PathLike[str], pgdata: str | os.PathLike[str], name: str) -> bool:
    """After a full wal-fetch put segment `name` in place: move the window there and keep a worker running.

    Only for recoveries: restore_command runs in the data directory, so a call elsewhere (a person
    fetching one segment by hand) starts nothing. Also removes other spools nobody touched for a day.
    Returns whether a worker was started.
    """
    if not is_segment_name(name) or not os.path.isfile(os.path.join(pgdata, "PG_VERSION")):
        return False
    spool = _prepare(config, pgdata, name)
    _remove(spool, name)  # a copy the fast path did not take (it failed its check, or was late)
    return ensure_worker(config, pgdata)


def seed(config: str | os.PathLike[str], pgdata: str | os.PathLike[str], first: str, segment_size: int) -> bool:
    """Before recovery starts (the end of a restore): a worker fetching from segment `first` on, so that
    PostgreSQL's first segments come from the spool too. A worker nobody asks anything of exits after
    IDLE_EXIT. Returns whether a worker was started."""
    if not is_segment_name(first) or first[8:] == "0" * 16:
        return False  # no segment before the first one to put the window after
    _prepare(config, pgdata, segment_after(first, -1, segment_size))
    return ensure_worker(config, pgdata)


def _prepare(config: str | os.PathLike[str], pgdata: str | os.PathLike[str], want: str) -> Path:
    spool = fetch_spool(config, pgdata)
    remove_stale_spools(keep=spool)
    _make_dirs(spool)
    set_want(spool, want)
    return spool


def remove_stale_spools(*, keep: Path | None = None, max_age: float = STALE_SPOOL_AGE,
                        segments_age: float = STALE_SEGMENTS_AGE) -> list[Path]:
    """Tidy the spools of other recoveries whose worker is gone: drop their segments once untouched for
    segments_age seconds (a worker that was killed could not), remove them whole after max_age (a
    recovery that never ended). Returns the spools removed whole."""
    import shutil

    removed: list[Path] = []
    try:
        entries = list(os.scandir(spool_root() / "fetch"))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        spool = Path(entry.path)
        if spool == keep or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            touched = max(os.stat(spool).st_mtime, *(os.stat(spool / f).st_mtime for f in (WANT, LOCK)
                                                      if (spool / f).exists()))
        except OSError:
            continue
        if now - touched <= min(max_age, segments_age) or _holder(spool) is not None:
            continue
        if now - touched > max_age:
            shutil.rmtree(spool, ignore_errors=True)
            removed.append(spool)
        else:
            with contextlib.suppress(OSError):
                _remove_segments(spool)
                _sweep(spool)
    return removed


# ---- the end of recovery -------------------------------------------------------------------------


class SpoolReport:
    """What a spool did, read when it is removed."""

    def __init__(self, fetched: int, served: int, notes: list[str]) -> None:
        self.fetched = fetched  # segments the worker put in the spool
        self.served = served  # segments handed to PostgreSQL from it
        self.notes = notes  # worker.log


def report_lines(report: SpoolReport) -> list[str]:
    """What `wal-prefetch --clean` tells the server log about a removed spool."""
    return [*(f"pgvault wal-fetch prefetch: {line}" for line in report.notes),
            f"pgvault wal-fetch prefetch: {report.fetched} segments prefetched, {report.served} served from the "
            "spool; spool removed"]


def fast_clean(config: str, quiet: bool) -> int | None:
    """recovery_end_command (`wal-prefetch --clean`) without the CLI: PostgreSQL waits for it before
    it promotes. Runs in the data directory, as PostgreSQL runs it. A policy file that is not there
    goes to the full path, which says so."""
    if not os.path.isfile(config):
        return None
    report = clean_spool(config, os.getcwd())
    if report is not None and not quiet:
        sys.stderr.write("".join(line + "\n" for line in report_lines(report)))
    return 0


def clean_spool(config: str | os.PathLike[str], pgdata: str | os.PathLike[str]) -> SpoolReport | None:
    """Stop the spool's worker and remove the spool (recovery_end_command). None if there was none."""
    import shutil

    spool = fetch_spool(config, pgdata)
    if not spool.is_dir():
        return None
    pid = _holder(spool)
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while _holder(spool) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
    try:
        notes = (spool / LOG).read_text(errors="replace").splitlines()
    except OSError:
        notes = []
    report = SpoolReport(_count_lines(spool / FETCHED), _count_lines(spool / SERVED), notes)
    shutil.rmtree(spool)
    return report


# ---- the worker ----------------------------------------------------------------------------------


class WorkerSettings:
    def __init__(self, count: int, parallel: int, max_bytes: int, segment_size: int) -> None:
        self.count = count
        self.parallel = parallel
        self.max_bytes = max_bytes
        self.segment_size = segment_size


def _prefetch_one(storage: Storage, layout: Layout, spool: Path, name: str) -> FetchedWal:
    """Fetch one segment into the spool: temporary name, checked, fsynced, sidecar, then its own name."""
    from pgvault.archive import fetch_into

    tmp = spool / f".{name}{TMP}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            fetched = fetch_into(storage, layout, name, out)
            out.flush()
            os.fsync(out.fileno())
        _write_atomically(spool / (name + SIDECAR), f"{fetched.raw_size} {fetched.raw_sha256}\n")
        os.rename(tmp, spool / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return fetched


def run_worker(config: Path, pgdata: Path) -> None:
    """The prefetch worker of one spool: keep the window after `want` full until idle or the spool goes.

    Returns at once when another worker holds the spool's lock. Storage faults are retried by the
    storage's own retry policy; a segment that still fails (or is not in the repository) stops the
    window there until PostgreSQL moves on, and the full path, asked for it, reports what is wrong.
    """
    spool = fetch_spool(config, pgdata)
    _make_dirs(spool)
    lock_fd = take_lock(spool / LOCK)
    if lock_fd is None:
        return
    log_to(spool / LOG)  # the storage's retry messages go to worker.log with the worker's own
    signal.signal(signal.SIGTERM, _stop_handler(spool))
    os.chdir(spool)  # nothing of PGDATA's stays busy because of us
    try:
        _sweep(spool)
        from pgvault.catalog import Catalog
        from pgvault.config import load_policy
        from pgvault.repo import open_storage

        policy_sha256 = _policy_sha256(config)
        policy = load_policy(config)
        if policy.restore.prefetch == 0:
            _remove_segments(spool)
            return
        storage = open_storage(policy.repository)
        catalog = Catalog(storage, policy.cluster)
        settings = WorkerSettings(policy.restore.prefetch, policy.restore.prefetch_parallel,
                                  policy.restore.prefetch_max_bytes, catalog.require_cluster_info().wal_segment_size)
        note(spool, f"worker started: {settings.count} segments ahead, {settings.parallel} at once, at most "
             f"{settings.max_bytes} bytes")
        if policy_sha256 is not None:
            _write_atomically(spool / POLICY, policy_sha256 + "\n")  # fast paths ask only this policy's worker
        _work(spool, lock_fd, storage, catalog.layout, settings)
    except Exception as exc:  # the full path still works without us; say why we stopped
        from pgvault.errors import PgvaultError

        note(spool, f"worker stopped: {exc.message if isinstance(exc, PgvaultError) else repr(exc)}")
    finally:
        os.close(lock_fd)


def _answer(spool: Path, storage: Storage, layout: Layout) -> bool:
    """Answer the fast paths' questions (see _ask) by looking in the repository now. Only an intact
    repository may say "absent", as in the full path: an unmounted or emptied one gets no answer, so
    the full path reports it. Returns whether there was a question."""
    from pgvault.errors import PgvaultError

    questions = [entry for entry in os.scandir(spool) if entry.name.startswith(ASK)]
    for entry in questions:
        pid = entry.name[len(ASK):]
        try:
            name = Path(entry.path).read_text().strip()
        except FileNotFoundError:
            continue  # the asker gave up
        if not (is_segment_name(name) or is_history_name(name)):
            continue
        try:
            if storage.head(layout.wal_key(name)) is not None:
                said = PRESENT
            elif storage.head(layout.cluster_json) is not None:
                said = ABSENT
            else:
                continue
        except PgvaultError as exc:
            note(spool, f"{name}: cannot tell whether it is archived ({exc.message}); the full wal-fetch will")
            continue
        with contextlib.suppress(OSError):
            _write_atomically(spool / f"{ANSWER}{pid}", f"{said} {name}\n")
    return bool(questions)


def _stop_handler(spool: Path) -> Any:
    """SIGTERM (wal-prefetch --clean, or whoever stops the server's processes): drop the segments and
    temporary files at once and exit, without waiting for the fetches in flight. A worker killed
    without a chance to do this leaves them to remove_stale_spools."""

    def stop(_signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            _remove_segments(spool)
            _sweep(spool)
        os._exit(0)

    return stop


def _sweep(spool: Path) -> None:
    """Temporary files of a worker or fast path that was killed (the lock says no worker runs now)."""
    for entry in os.scandir(spool):
        segment = entry.name[1:].split(".", 1)[0]
        if not entry.name.startswith(".") or not is_segment_name(segment):
            continue
        # A fast path handing a segment over renamed it a moment ago (rename sets ctime): leave that be.
        fetching = entry.name == f".{segment}{TMP}"
        with contextlib.suppress(OSError):
            if fetching or (TAKE in entry.name and time.time() - entry.stat().st_ctime > 60):
                os.unlink(entry.path)


def _work(spool: Path, lock_fd: int, storage: Storage, layout: Layout, settings: WorkerSettings) -> None:
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from pgvault.errors import ObjectNotFound, PgvaultError

    want: str | None = None
    stop_at: str | None = None
    running: dict[Future[Any], str] = {}
    last_activity = time.monotonic()
    pool = ThreadPoolExecutor(settings.parallel, thread_name_prefix="prefetch")
    try:
        while still_holds(spool / LOCK, lock_fd):
            if _answer(spool, storage, layout):
                last_activity = time.monotonic()
            asked = read_want(spool)
            if asked != want:
                if want is not None and asked is not None and not at_or_after(asked, want):
                    note(spool, f"window restarts at {asked} (PostgreSQL asked for an earlier segment or another "
                         "timeline)")
                want, stop_at, last_activity = asked, None, time.monotonic()
            if want is not None:
                spooled, taken = scan(spool, settings.segment_size)
                step = plan(want, spooled, set(running.values()), stop_at, count=settings.count,
                            parallel=settings.parallel, max_bytes=settings.max_bytes,
                            segment_size=settings.segment_size, handing_over=taken)
                for name in step.drop:
                    _remove(spool, name)
                for name in step.start:
                    running[pool.submit(_prefetch_one, storage, layout, spool, name)] = name
            if not running:
                if time.monotonic() - last_activity > IDLE_EXIT:
                    note(spool, f"worker idle for {IDLE_EXIT:.0f} s: dropping the spooled segments and exiting")
                    _remove_segments(spool)
                    return
                time.sleep(POLL)
                continue
            done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                last_activity = time.monotonic()
                exc = future.exception()
                if exc is None:
                    _append(spool / FETCHED, name)
                    continue
                in_window = want is not None and name in window(want, settings.count, settings.segment_size)
                if in_window and (stop_at is None or not at_or_after(name, stop_at)):
                    stop_at = name
                if isinstance(exc, ObjectNotFound):
                    continue  # the end of the archive (for now): PostgreSQL's own call will say so
                message = exc.message if isinstance(exc, PgvaultError) else repr(exc)
                note(spool, f"{name}: not prefetched: {message}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
