"""archive.background without PostgreSQL: which segments the pusher takes, its loop (pushes, limits,
failures, stopping), and how PostgreSQL's call waits for it (push_ahead.await_pusher).

The loop runs in a thread here with a stand-in for archive.push that writes the marker the real one
would; tests/integration/test_wal_push_ahead.py runs the detached pusher under a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from pgvault import push_ahead, pusher
from pgvault.config import parse_policy
from pgvault.push_ahead import BUSY_PREFIX, PUSHER_LOCK, await_pusher, fast_push, marker_bytes, prepare_spool
from pgvault.pusher import choose, ensure_pusher
from pgvault.spool import policy_digest, push_spool, take_lock


def seg(number: int) -> str:
    return f"00000001{number >> 8:08X}{number & 0xFF:08X}"


S = [seg(n) for n in range(1, 21)]


# ---- the choice ---------------------------------------------------------------------------------------

def test_choose_takes_unmarked_ready_segments_oldest_first_within_both_limits() -> None:
    ready = set(S[:10])
    assert choose(ready, set(), set(), ahead=8, free=4) == S[:4]
    # Marked or in flight: not again, and they count against `ahead`.
    assert choose(ready, {S[0], S[1]}, {S[2]}, ahead=8, free=4) == S[3:7]
    assert choose(ready, set(S[:6]), {S[6]}, ahead=8, free=4) == [S[7]]
    assert choose(ready, set(S[:8]), set(), ahead=8, free=4) == []
    # A marker for a segment no longer .ready (PostgreSQL archived it) does not count.
    assert choose(ready, {S[15], S[16]}, set(), ahead=3, free=4) == S[:3]
    # Nothing free, nothing ready.
    assert choose(ready, set(), set(S[:4]), ahead=8, free=0) == []
    assert choose(set(), set(), set(), ahead=8, free=4) == []


def test_choose_leaves_what_the_starting_call_pushed_what_it_pushed_before_and_non_segments() -> None:
    ready = {S[0], S[1], S[2], "00000002.history", f"{S[3]}.partial", f"{S[0]}.00000028.backup"}
    assert choose(ready, set(), set(), ahead=8, free=8, skip=S[0]) == [S[1], S[2]]
    assert choose(ready, set(), set(), ahead=8, free=8, done={S[1]}) == [S[0], S[2]]


# ---- the loop -----------------------------------------------------------------------------------------

class Wal:
    """A pg_wal with `.ready` segments, a policy file, the push spool, and a stand-in push."""

    def __init__(self, root: Path, count: int) -> None:
        self.pg_wal = root / "pgdata" / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)
        self.policy = root / "policy.yaml"
        self.policy.write_text("cluster: main\n")
        self.spool = push_spool(self.policy)
        assert prepare_spool(str(self.spool))
        self.pushed: list[str] = []
        self.fail: set[str] = set()
        self.lock = threading.Lock()
        for name in S[:count]:
            self.add(name)

    def add(self, name: str) -> None:
        (self.pg_wal / name).write_bytes(name.encode())
        (self.pg_wal / "archive_status" / f"{name}.ready").write_text("")

    def archive(self, name: str) -> None:
        """What PostgreSQL does after a call for name exited 0."""
        os.rename(self.pg_wal / "archive_status" / f"{name}.ready", self.pg_wal / "archive_status" / f"{name}.done")

    def push_one(self, name: str) -> None:
        try:
            assert (self.spool / f"{BUSY_PREFIX}{name}").exists(), "busy while pushed"
            time.sleep(0.01)
            if name in self.fail:
                raise OSError(f"cannot push {name}")
            with self.lock:
                self.pushed.append(name)
            push_ahead.write_marker(str(self.spool), name, marker_bytes(
                name, len(name), hashlib.sha256(name.encode()).hexdigest(), os.path.realpath(self.pg_wal),
                policy_digest(self.policy), time.time()))
        finally:
            pusher._unbusy(self.spool, name)

    def markers(self) -> set[str]:
        return {p.name for p in self.spool.iterdir() if push_ahead.is_segment_name(p.name)}


def run(wal: Wal, *, ahead: int = 8, threads: int = 2, still_valid: object = None, skip: str = "",
        stop: threading.Event | None = None) -> tuple[str, list[str]]:
    lines: list[str] = []
    why = pusher._work(wal.spool, wal.pg_wal, wal.push_one, stop or threading.Event(), lines.append,
                       still_valid or (lambda: None), ahead=ahead, threads=threads, skip=skip)  # type: ignore[arg-type]
    return why, lines


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path / "spool-root"))
    monkeypatch.setattr(pusher, "IDLE_EXIT", 0.3)
    monkeypatch.setattr(pusher, "CHECK_EVERY", 0.05)


def test_the_loop_pushes_up_to_ahead_segments_oldest_first_then_exits_when_idle(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 12)
    why, lines = run(wal, ahead=8, skip=S[0])
    assert why == "nothing to push for 0 s"  # IDLE_EXIT as patched, printed whole seconds
    assert sorted(wal.pushed) == S[1:9] and wal.markers() == set(S[1:9]) and not lines
    assert not [p for p in wal.spool.iterdir() if p.name.startswith(BUSY_PREFIX)]


def test_the_loop_keeps_ahead_as_postgresql_uses_the_markers(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 4)
    stop = threading.Event()
    result: list[tuple[str, list[str]]] = []
    worker = threading.Thread(target=lambda: result.append(run(wal, ahead=3, stop=stop)))
    worker.start()
    try:
        # PostgreSQL's calls, one after the other: each waits for the pusher and uses its marker.
        for n in range(12):
            if n + 4 < 16:
                wal.add(S[n + 4])
            deadline = time.monotonic() + 5
            while S[n] not in wal.markers():
                assert time.monotonic() < deadline, f"{S[n]} never marked"
                time.sleep(0.005)
            assert len(wal.markers()) <= 3
            push_ahead.forget(str(wal.spool), S[n])
            wal.archive(S[n])
    finally:
        stop.set()
        worker.join(10)
    assert result and result[0][0] == "asked to stop"
    assert sorted(wal.pushed)[:12] == S[:12] and len(wal.pushed) == len(set(wal.pushed))  # each once


def test_a_failed_push_is_logged_pauses_the_pusher_and_is_tried_again(fast: None, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pusher, "FAILURE_BACKOFF", 0.2)
    wal = Wal(tmp_path, 3)
    wal.fail = {S[0]}
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    why, lines = run(wal, threads=2, stop=stop)
    assert why == "asked to stop"  # a segment that keeps failing is not "nothing to push"
    assert lines[0] == f"{S[0]} not pushed: OSError: cannot push {S[0]}"
    assert S[0] not in wal.markers() and {S[1], S[2]} <= wal.markers()
    assert 2 <= lines.count(lines[0]) <= 6  # tried again after each pause, not in a tight loop


def test_the_loop_stops_when_told_why_and_when_pg_wal_goes(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 2)
    why, _ = run(wal, still_valid=lambda: "PostgreSQL stopped")
    assert why == "PostgreSQL stopped" and wal.pushed == []
    (wal.pg_wal / "archive_status").rename(tmp_path / "elsewhere")
    why, _ = run(wal)
    assert why == f"{wal.pg_wal / 'archive_status'} cannot be read"


def test_still_valid_names_a_stopped_server_a_changed_policy_and_a_removed_spool(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 1)
    lock = wal.spool / PUSHER_LOCK
    fd = take_lock(lock, str(wal.pg_wal))
    assert fd is not None
    try:
        digest = policy_digest(wal.policy)
        check = lambda: pusher._still_valid(wal.policy, digest, lock, fd, wal.pg_wal)  # noqa: E731
        assert check() == "PostgreSQL stopped"
        (wal.pg_wal.parent / "postmaster.pid").write_text("1\n")
        assert check() is None
        wal.policy.write_text("cluster: other\n")
        assert check() == "the policy file changed"
        os.unlink(lock)
        assert check() == "its spool was removed"
    finally:
        os.close(fd)


# ---- PostgreSQL's call waits for the pusher ---------------------------------------------------------------

@pytest.fixture
def held(fast: None, tmp_path: Path) -> tuple[Wal, int]:
    wal = Wal(tmp_path, 2)
    fd = take_lock(wal.spool / PUSHER_LOCK, os.path.abspath(wal.pg_wal))  # this test plays the pusher
    assert fd is not None
    return wal, fd


def test_a_call_waits_for_the_segment_the_pusher_is_pushing_and_uses_its_marker(held: tuple[Wal, int]) -> None:
    wal, fd = held
    try:
        pusher._busy(wal.spool, S[0])
        timer = threading.Timer(0.3, wal.push_one, [S[0]])
        started = time.monotonic()
        timer.start()
        # The stand-in push writes a marker for content name.encode(): what Wal.add wrote.
        assert fast_push(str(wal.policy), [str(wal.pg_wal / S[0])]) == 0
        assert time.monotonic() - started >= 0.29
        assert S[0] not in wal.markers()  # used
    finally:
        os.close(fd)


def test_a_call_waits_briefly_for_the_pusher_to_take_a_segment_up(held: tuple[Wal, int],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    wal, fd = held
    try:
        # Taken up and pushed within the pickup wait: answered from the marker.
        timer = threading.Timer(0.1, lambda: (pusher._busy(wal.spool, S[0]), wal.push_one(S[0])))
        timer.start()
        assert fast_push(str(wal.policy), [str(wal.pg_wal / S[0])]) == 0
        # Never taken up (a pusher pausing after a failure): the full path, after PICKUP_WAIT.
        monkeypatch.setattr(push_ahead, "PICKUP_WAIT", 0.2)
        started = time.monotonic()
        assert fast_push(str(wal.policy), [str(wal.pg_wal / S[1])]) is None
        assert 0.2 <= time.monotonic() - started < 2
    finally:
        os.close(fd)


def test_no_wait_without_a_pusher_for_this_pg_wal_or_for_a_segment_not_ready(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 2)
    pusher._busy(wal.spool, S[0])  # left by a killed pusher: no lock is held
    started = time.monotonic()
    assert fast_push(str(wal.policy), [str(wal.pg_wal / S[0])]) is None
    fd = take_lock(wal.spool / PUSHER_LOCK, "/elsewhere/pg_wal")  # a pusher serving another pg_wal
    assert fd is not None
    try:
        assert fast_push(str(wal.policy), [str(wal.pg_wal / S[0])]) is None
    finally:
        os.close(fd)
    fd = take_lock(wal.spool / PUSHER_LOCK, os.path.abspath(wal.pg_wal))
    assert fd is not None
    try:
        wal.archive(S[1])  # not .ready: not PostgreSQL's queue, the pusher will not push it
        assert await_pusher(str(wal.spool), S[1], str(wal.pg_wal)) is False
    finally:
        os.close(fd)
    assert time.monotonic() - started < 0.2


def test_a_call_stops_waiting_when_the_pusher_dies(held: tuple[Wal, int]) -> None:
    wal, fd = held
    pusher._busy(wal.spool, S[0])
    threading.Timer(0.2, os.close, [fd]).start()  # the pusher killed mid-push: its lock goes with it
    started = time.monotonic()
    assert fast_push(str(wal.policy), [str(wal.pg_wal / S[0])]) is None
    assert time.monotonic() - started < 1.5


# ---- starting one ---------------------------------------------------------------------------------------

def test_ensure_pusher_needs_a_running_server_and_a_pusher_for_this_pg_wal(fast: None, tmp_path: Path) -> None:
    wal = Wal(tmp_path, 1)
    assert ensure_pusher(wal.policy, wal.pg_wal, S[0]) is False  # no postmaster.pid: a file pushed by hand
    (wal.pg_wal.parent / "postmaster.pid").write_text("1\n")
    fd = take_lock(wal.spool / PUSHER_LOCK, os.path.abspath(wal.pg_wal))
    assert fd is not None
    try:
        assert ensure_pusher(wal.policy, wal.pg_wal, S[0]) is True  # one runs: nothing started
    finally:
        os.close(fd)
    fd = take_lock(wal.spool / PUSHER_LOCK, "/elsewhere/pg_wal")
    assert fd is not None
    try:
        assert ensure_pusher(wal.policy, wal.pg_wal, S[0]) is False  # one runs for another pg_wal
    finally:
        os.close(fd)


def test_background_setting() -> None:
    base = {"cluster": "main", "postgres": {"conninfo": "host=/tmp"}, "repository": {"url": "file:///srv/r"}}
    assert parse_policy(base, "p.yaml").archive.background is False
    assert parse_policy({**base, "archive": {"background": True}}, "p.yaml").archive.background is True
