"""wal-fetch prefetch: the window the worker keeps full, and the fast path that serves from the spool."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault import prefetch
from pgvault.prefetch import fast_fetch, plan, segment_after, window
from pgvault.spool import fetch_spool

SEG = 16 * 1024 * 1024
A = "000000010000000000000010"  # timeline 1, segment 0x10


def names(first: int, count: int, timeline: int = 1) -> list[str]:
    return [f"{timeline:08X}00000000{n:08X}" for n in range(first, first + count)]


# ---- names -------------------------------------------------------------------------------------------

def test_segment_after_crosses_into_the_next_log_file() -> None:
    assert segment_after("0000000100000000000000FF", 1, SEG) == "000000010000000100000000"
    assert segment_after("0000000300000001000000FE", 3, SEG) == "000000030000000200000001"
    # 1 GiB segments: four per log file.
    assert segment_after("000000010000000000000003", 1, 1024**3) == "000000010000000100000000"


def test_the_window_is_the_next_segments_on_the_same_timeline_nearest_first() -> None:
    assert window("000000020000000000000010", 3, SEG) == names(0x11, 3, timeline=2)


# ---- plan --------------------------------------------------------------------------------------------

def test_an_empty_spool_starts_the_nearest_segments_up_to_the_parallelism() -> None:
    step = plan(A, {}, set(), None, count=8, parallel=4, max_bytes=1 << 30, segment_size=SEG)
    assert step.start == tuple(names(0x11, 4)) and step.drop == ()


def test_segments_spooled_or_in_flight_are_not_fetched_again() -> None:
    spooled = dict.fromkeys(names(0x11, 2), SEG)
    step = plan(A, spooled, {names(0x13, 1)[0]}, None, count=8, parallel=4, max_bytes=1 << 30, segment_size=SEG)
    assert step.start == tuple(names(0x14, 3))


def test_the_count_bound_counts_spooled_in_flight_and_handed_over_segments() -> None:
    spooled = dict.fromkeys(names(0x11, 2), SEG)
    step = plan(A, spooled, {names(0x13, 1)[0]}, None, count=4, parallel=8, max_bytes=1 << 30, segment_size=SEG,
                handing_over=[SEG])
    assert step.start == ()  # 2 spooled + 1 fetching + 1 being handed over = 4
    step = plan(A, spooled, set(), None, count=4, parallel=8, max_bytes=1 << 30, segment_size=SEG)
    assert step.start == tuple(names(0x13, 2))


def test_the_byte_bound_reserves_a_whole_segment_for_each_fetch() -> None:
    step = plan(A, {}, set(), None, count=8, parallel=8, max_bytes=3 * SEG + SEG // 2, segment_size=SEG)
    assert step.start == tuple(names(0x11, 3))
    spooled = {names(0x11, 1)[0]: SEG}
    step = plan(A, spooled, {names(0x12, 1)[0]}, None, count=8, parallel=8, max_bytes=3 * SEG, segment_size=SEG)
    assert step.start == tuple(names(0x13, 1))


def test_a_bound_smaller_than_one_segment_fetches_nothing() -> None:
    step = plan(A, {}, set(), None, count=8, parallel=4, max_bytes=SEG - 1, segment_size=SEG)
    assert step.start == ()


def test_older_segments_and_other_timelines_are_dropped_but_the_one_being_asked_for_is_kept() -> None:
    older = names(0x0E, 2)
    other_timeline = names(0x11, 2, timeline=2)
    ahead = names(0x11, 2)
    spooled = dict.fromkeys([*older, *other_timeline, A, *ahead], SEG)
    step = plan(A, spooled, set(), None, count=8, parallel=4, max_bytes=1 << 30, segment_size=SEG)
    assert step.drop == tuple(sorted(older + other_timeline))
    assert A not in step.drop  # a fast path may be taking it right now
    assert step.start == tuple(names(0x13, 4))


def test_postgres_moving_back_restarts_the_window_there() -> None:
    spooled = dict.fromkeys(names(0x11, 6), SEG)  # the window after 0x10
    step = plan(names(0x0C, 1)[0], spooled, set(), None, count=6, parallel=4, max_bytes=1 << 30, segment_size=SEG)
    # The window after 0x0C is 0x0D..0x12: what lies beyond it goes, the gap before it is fetched first.
    assert step.drop == tuple(names(0x13, 4))
    assert step.start == tuple(names(0x0D, 4))


def test_a_new_timeline_restarts_the_window_on_it() -> None:
    spooled = dict.fromkeys(names(0x11, 3), SEG)
    want = "000000020000000000000011"
    step = plan(want, spooled, set(), None, count=4, parallel=4, max_bytes=1 << 30, segment_size=SEG)
    assert step.drop == tuple(names(0x11, 3))
    assert step.start == tuple(names(0x12, 4, timeline=2))


def test_nothing_is_fetched_at_or_beyond_the_end_of_the_archive() -> None:
    end = names(0x13, 1)[0]
    step = plan(A, {}, set(), end, count=8, parallel=8, max_bytes=1 << 30, segment_size=SEG)
    assert step.start == tuple(names(0x11, 2))
    # An end mark of another timeline does not stop this one.
    step = plan(A, {}, set(), "000000020000000000000012", count=2, parallel=8, max_bytes=1 << 30, segment_size=SEG)
    assert step.start == tuple(names(0x11, 2))


@given(
    want=st.integers(0x10, 0x30),
    spooled=st.sets(st.integers(0x00, 0x40), max_size=12),
    fetching=st.sets(st.integers(0x00, 0x40), max_size=6),
    handing=st.integers(0, 2),
    count=st.integers(1, 12),
    parallel=st.integers(1, 8),
    max_segments=st.integers(0, 14),
)
def test_the_spool_never_grows_past_its_bounds(want: int, spooled: set[int], fetching: set[int], handing: int,
                                                count: int, parallel: int, max_segments: int) -> None:
    want_name = names(want, 1)[0]
    on_disk = {names(n, 1)[0]: SEG for n in spooled}
    in_flight = {names(n, 1)[0] for n in fetching} - set(on_disk)
    step = plan(want_name, on_disk, in_flight, None, count=count, parallel=parallel, max_bytes=max_segments * SEG,
                segment_size=SEG, handing_over=[SEG] * handing)
    after = len(on_disk) - len(step.drop) + len(in_flight) + handing
    assert len(step.start) <= max(0, parallel - len(in_flight))
    if step.start:  # whatever it starts fits within both bounds
        assert after + len(step.start) <= count
        assert (after + len(step.start)) * SEG <= max_segments * SEG
    ahead = window(want_name, count, SEG)
    assert all(name in ahead for name in step.start)
    assert list(step.start) == sorted(step.start)
    assert all(name not in ahead and name != want_name for name in step.drop)


# ---- the fast path -----------------------------------------------------------------------------------

@pytest.fixture
def recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path, Path]]:
    """A data directory as restore_command's working directory, and its (empty) spool, whose lock is
    held as a running worker holds it (so the fast path starts no worker from a unit test)."""
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path / "spool"))
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal").mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("15\n")
    monkeypatch.chdir(pgdata)
    config = str(tmp_path / "policy.yaml")
    spool = fetch_spool(config, pgdata)
    spool.mkdir(parents=True)
    lock = os.open(spool / prefetch.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, b"1\n")
    try:
        yield config, pgdata, spool
    finally:
        os.close(lock)


def spool_segment(spool: Path, name: str, data: bytes) -> None:
    (spool / (name + prefetch.SIDECAR)).write_text(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")
    (spool / name).write_bytes(data)


def test_a_spooled_segment_is_put_in_place_and_kept_for_the_re_read_at_the_end_of_recovery(
        recovery: tuple[str, Path, Path]) -> None:
    config, pgdata, spool = recovery
    data = os.urandom(64 * 1024)
    spool_segment(spool, A, data)
    assert fast_fetch(config, [A, "pg_wal/RECOVERYXLOG"]) == 0
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    assert prefetch.read_want(spool) == A
    # Still spooled (the same file, linked), as `want`, which the worker keeps until the next segment.
    assert prefetch.spooled_segments(spool) == {A: len(data)}
    assert os.path.samefile(spool / A, pgdata / "pg_wal" / "RECOVERYXLOG")
    (pgdata / "pg_wal" / "RECOVERYXLOG").unlink()  # as PostgreSQL does once it has read it
    assert fast_fetch(config, [A, "pg_wal/RECOVERYXLOG"]) == 0  # recovery ends in A: A again
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    assert (spool / prefetch.SERVED).read_text().split() == [A, A]
    assert not [p.name for p in spool.iterdir() if prefetch.TAKE in p.name or p.name.endswith(".pgvault-tmp")]


def test_a_spooled_segment_that_fails_its_checksum_is_deleted_not_handed_over(
        recovery: tuple[str, Path, Path]) -> None:
    config, pgdata, spool = recovery
    data = bytearray(os.urandom(64 * 1024))
    spool_segment(spool, A, bytes(data))
    data[100] ^= 0x01
    (spool / A).write_bytes(bytes(data))
    assert fast_fetch(config, [A, "pg_wal/RECOVERYXLOG"]) is None
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()
    assert not (spool / A).exists()
    assert "does not match its SHA-256" in (spool / prefetch.LOG).read_text()


def test_a_truncated_spooled_segment_is_not_handed_over(recovery: tuple[str, Path, Path]) -> None:
    config, pgdata, spool = recovery
    data = os.urandom(64 * 1024)
    spool_segment(spool, A, data)
    (spool / A).write_bytes(data[:-1])
    assert fast_fetch(config, [A, "pg_wal/RECOVERYXLOG"]) is None
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()


def test_a_segment_without_its_sidecar_is_not_served(recovery: tuple[str, Path, Path]) -> None:
    config, pgdata, spool = recovery
    (spool / A).write_bytes(b"x" * 1000)
    assert fast_fetch(config, [A, "pg_wal/RECOVERYXLOG"]) is None
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()


@pytest.mark.parametrize("args", [
    ["00000002.history", "pg_wal/RECOVERYHISTORY"],  # history files are never spooled
    [A.replace("00000001", "00000002", 1), "pg_wal/RECOVERYXLOG"],  # another timeline than the spooled one
    ["000000010000000000000011", "pg_wal/RECOVERYXLOG"],  # not spooled (or the end of the archive)
    [A],  # not restore_command's arguments
])
def test_anything_not_spooled_goes_to_the_full_path_never_answering_not_found(
        recovery: tuple[str, Path, Path], args: list[str]) -> None:
    config, pgdata, spool = recovery
    spool_segment(spool, A, b"segment")
    assert fast_fetch(config, args) is None
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()
    assert (spool / A).exists()


def test_without_a_spool_the_fast_path_answers_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    assert fast_fetch(str(tmp_path / "policy.yaml"), [A, "pg_wal/RECOVERYXLOG"]) is None
    assert not (tmp_path / "none").exists()


def test_the_fast_path_imports_only_the_standard_library() -> None:
    probe = ("import sys, pgvault.prefetch; "
             "print(sorted({'click', 'pydantic', 'yaml', 'boto3', 'botocore', 'zstandard', 'psycopg'} "
             "& {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- stale spools ------------------------------------------------------------------------------------

def test_spools_of_gone_workers_lose_their_segments_after_minutes_and_go_after_a_day(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path))
    old, idle, fresh, busy = (fetch_spool(str(tmp_path / "p.yaml"), str(tmp_path / d)) for d in "abcd")
    for spool in (old, idle, fresh, busy):
        spool.mkdir(parents=True)
        prefetch.set_want(spool, A)
        spool_segment(spool, names(0x11, 1)[0], b"segment")
        (spool / f".{names(0x12, 1)[0]}{prefetch.TMP}").write_bytes(b"half")  # a killed worker's fetch
    lock = os.open(busy / prefetch.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        now = os.stat(old).st_mtime
        ages = {old: 2 * prefetch.STALE_SPOOL_AGE, idle: 2 * prefetch.STALE_SEGMENTS_AGE,
                busy: 2 * prefetch.STALE_SPOOL_AGE}
        for spool, age in ages.items():
            for path in (spool, spool / prefetch.WANT, spool / prefetch.LOCK):
                if path.exists():
                    os.utime(path, (now - age, now - age))
        assert prefetch.remove_stale_spools() == [old]
    finally:
        os.close(lock)
    assert not old.exists()
    assert idle.exists() and prefetch.spooled_segments(idle) == {}
    assert not any(p.name.endswith(prefetch.TMP) for p in idle.iterdir())
    assert prefetch.read_want(idle) == A  # what it did stays until the day is over
    for kept in (fresh, busy):  # recent, or its worker runs
        assert list(prefetch.spooled_segments(kept)) == names(0x11, 1)


def test_a_stopped_worker_drops_its_segments_and_temporary_files(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spool_segment(tmp_path, A, b"segment")
    (tmp_path / f".{names(0x11, 1)[0]}{prefetch.TMP}").write_bytes(b"half")
    prefetch.set_want(tmp_path, A)

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(prefetch.os, "_exit", exit_)
    with pytest.raises(SystemExit):
        prefetch._stop_handler(tmp_path)(15, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [prefetch.WANT]


def test_a_segment_handed_over_while_the_spool_is_listed_still_counts(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The listing is one snapshot, the sizes are asked for afterwards: a fast path renaming the
    # segment in between (to hand it over) must not make it count as neither name.
    spool_segment(tmp_path, A, b"x" * 1000)
    listing = os.scandir

    def listed_then_taken(path: Any) -> Iterator[os.DirEntry[str]]:
        entries = list(listing(path))
        os.rename(tmp_path / A, tmp_path / f".{A}{prefetch.TAKE}1")
        return iter(entries)

    monkeypatch.setattr(prefetch.os, "scandir", listed_then_taken)
    spooled, taken = prefetch.scan(tmp_path, SEG)
    assert len(spooled) + len(taken) == 1
    assert sum(spooled.values()) + sum(taken) == SEG  # its size is no longer known: a whole segment


# ---- started by restore, removed when recovery ends -----------------------------------------------------

def test_a_restore_seeds_the_window_so_recovery_s_first_segment_is_fetched_ahead(
        recovery: tuple[str, Path, Path]) -> None:
    config, pgdata, spool = recovery  # the fixture holds the lock: no worker process is started here
    assert prefetch.seed(config, pgdata, "000000010000000100000000", SEG) is False
    # The window is the segments after `want`: the one before the first puts the first in it.
    assert prefetch.read_want(spool) == "0000000100000000000000FF"
    assert window(prefetch.read_want(spool) or "", 2, SEG) == ["000000010000000100000000", "000000010000000100000001"]


@pytest.mark.parametrize("first", ["000000010000000000000000", "00000002.history", "bogus"])
def test_seed_does_nothing_without_a_segment_before_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              first: str) -> None:
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path / "spool"))
    assert prefetch.seed(str(tmp_path / "policy.yaml"), tmp_path, first, SEG) is False
    assert not (tmp_path / "spool").exists()


def test_clean_fast_path_removes_the_spool_and_prints_its_report(
        recovery: tuple[str, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, _pgdata, spool = recovery
    assert prefetch.fast_clean(config, quiet=False) is None  # no policy file: the full path reports it
    assert spool.exists()
    Path(config).write_text("cluster: test\n")
    prefetch.note(spool, "worker started: 8 segments ahead")
    (spool / prefetch.FETCHED).write_text(f"{A}\n")
    (spool / prefetch.SERVED).write_text(f"{A}\n")
    os.unlink(spool / prefetch.LOCK)  # the fixture's stand-in worker is no process to stop: as one that exited
    assert prefetch.fast_clean(config, quiet=False) == 0
    assert not spool.exists()
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("worker started: 8 segments ahead")
    assert err[-1] == ("pgvault wal-fetch prefetch: 1 segments prefetched, 1 served from the spool; spool removed")
    assert prefetch.fast_clean(config, quiet=False) == 0  # again: nothing to do, nothing printed
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("argv", "expected"), [
    (["--config", "p.yaml", "wal-fetch", "A", "B"], ("p.yaml", "wal-fetch", ["A", "B"], False)),
    (["--config=p.yaml", "-q", "wal-push", "pg_wal/A"], ("p.yaml", "wal-push", ["pg_wal/A"], True)),
    (["--config", "p.yaml", "wal-prefetch", "--clean"], ("p.yaml", "wal-prefetch", ["--clean"], False)),
    (["--config", "p.yaml", "wal-prefetch", "--worker"], None),  # the worker needs the whole program
    (["--config", "p.yaml", "wal-fetch", "--help"], None),
    (["wal-fetch", "A", "B"], None),  # no policy named: the CLI's error
    (["--config", "p.yaml", "list"], None),
])
def test_only_the_per_segment_commands_take_the_fast_path(argv: list[str], expected: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pgvault.entry import parse_fast

    monkeypatch.delenv("PGVAULT_CONFIG", raising=False)
    assert parse_fast(argv) == expected


# ---- "is it archived?": asked of the running worker, which looks in the repository now -----------------

@pytest.fixture
def storage_with_cluster(tmp_path: Path) -> Any:
    import io

    from pgvault.repo.file import FileStorage
    from pgvault.repo.layout import Layout

    storage = FileStorage(tmp_path / "repo")
    layout = Layout("test")
    storage.put(layout.cluster_json, io.BytesIO(b"{}"))
    storage.put(layout.wal_key("00000002.history"), io.BytesIO(b"1\t0/3000000\tno recovery target specified\n"))
    return storage, layout


def ask_in_thread(spool: Path, config: str, name: str) -> dict[str, Any]:
    import threading

    said: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: said.update(answer=prefetch._ask(spool, config, name)))
    thread.start()
    said["thread"] = thread
    return said


def wait_for_question(spool: Path) -> None:
    import time

    deadline = time.monotonic() + 10
    while not [p for p in spool.iterdir() if p.name.startswith(prefetch.ASK)]:
        assert time.monotonic() < deadline, "the fast path asked nothing"
        time.sleep(0.005)


@pytest.mark.parametrize(("name", "expected"), [
    ("00000003.history", prefetch.ABSENT),
    ("00000002.history", prefetch.PRESENT),
    ("000000020000000000000005", prefetch.ABSENT),
])
def test_the_worker_answers_from_the_repository_as_it_is_now(recovery: tuple[str, Path, Path],
                                                             storage_with_cluster: Any, name: str,
                                                             expected: str) -> None:
    config, _pgdata, spool = recovery
    Path(config).write_text("cluster: test\n")
    (spool / prefetch.POLICY).write_text(hashlib.sha256(b"cluster: test\n").hexdigest() + "\n")
    storage, layout = storage_with_cluster
    said = ask_in_thread(spool, config, name)
    wait_for_question(spool)
    assert prefetch._answer(spool, storage, layout) is True
    said["thread"].join(10)
    assert said["answer"] == expected
    assert not [p.name for p in spool.iterdir() if p.name.startswith((prefetch.ASK, prefetch.ANSWER))]


def test_an_emptied_repository_gets_no_answer_so_the_full_path_reports_it(
        recovery: tuple[str, Path, Path], storage_with_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _pgdata, spool = recovery
    Path(config).write_text("cluster: test\n")
    (spool / prefetch.POLICY).write_text(hashlib.sha256(b"cluster: test\n").hexdigest() + "\n")
    storage, layout = storage_with_cluster
    storage.delete([layout.cluster_json])
    monkeypatch.setattr(prefetch, "ASK_WAIT", 0.5)
    said = ask_in_thread(spool, config, "00000003.history")
    wait_for_question(spool)
    prefetch._answer(spool, storage, layout)
    said["thread"].join(10)
    assert said["answer"] is None


def test_no_question_without_a_worker_or_to_a_worker_of_another_policy(recovery: tuple[str, Path, Path]) -> None:
    config, _pgdata, spool = recovery
    Path(config).write_text("cluster: test\n")
    # No policy recorded: a worker still starting (or of an older pgvault) is not asked.
    assert prefetch._ask(spool, config, "00000003.history") is None
    (spool / prefetch.POLICY).write_text(hashlib.sha256(b"cluster: other\n").hexdigest() + "\n")
    assert prefetch._ask(spool, config, "00000003.history") is None
    assert fast_fetch(config, ["00000003.history", "pg_wal/RECOVERYHISTORY"]) is None
    assert not [p.name for p in spool.iterdir() if p.name.startswith(prefetch.ASK)]


def test_not_archived_is_answered_by_the_fast_path_only_after_asking(recovery: tuple[str, Path, Path],
                                                                     storage_with_cluster: Any) -> None:
    import threading

    config, pgdata, spool = recovery
    Path(config).write_text("cluster: test\n")
    (spool / prefetch.POLICY).write_text(hashlib.sha256(b"cluster: test\n").hexdigest() + "\n")
    storage, layout = storage_with_cluster
    stop = threading.Event()

    def answer_until_stopped() -> None:  # the worker's loop, as far as questions go
        while not stop.is_set():
            prefetch._answer(spool, storage, layout)
            stop.wait(0.005)

    worker = threading.Thread(target=answer_until_stopped)
    worker.start()
    try:
        assert fast_fetch(config, ["00000003.history", "pg_wal/RECOVERYHISTORY"]) == 1
        assert fast_fetch(config, ["00000002.history", "pg_wal/RECOVERYHISTORY"]) is None  # the full path fetches it
        assert fast_fetch(config, ["000000010000000000000011", "pg_wal/RECOVERYXLOG"]) == 1
    finally:
        stop.set()
        worker.join(10)
    assert not (pgdata / "pg_wal" / "RECOVERYHISTORY").exists()
