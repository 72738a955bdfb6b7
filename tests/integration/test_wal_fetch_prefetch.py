"""wal-fetch prefetch against real PostgreSQL: the spool speeds recovery up and never changes what it restores.

PostgreSQL calls restore_command (`pgvault wal-fetch %f %p`, in the data directory) once per file; a
worker fetches the next segments into a spool outside the data directory, and the next calls take
them from there after checking their SHA-256. These tests restore to exact rows with the spool in
use, damage the spool, switch timelines under it, watch its size, and check that the exit codes
PostgreSQL relies on did not change. What the spool did is read where an operator reads it: the
server log, to which recovery_end_command (`wal-prefetch --clean`) prints it when recovery ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import (
    PGVAULT,
    Cluster,
    Mark,
    Marks,
    Result,
    make_workdir,
    moto,
    new_cluster,
    rows_of,
    wait_for,
    write_policy,
)
from faultproxy import FaultProxy
from repos import S3Repo

from pgvault import prefetch
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user
from pgvault.pg.wal import WalSegment, parse_history
from pgvault.repo.layout import Layout
from pgvault.spool import fetch_spool

pytestmark = [pytest.mark.integration]

SEG = 16 * 1024 * 1024
LAYOUT = Layout("test")
REPORT = re.compile(r"pgvault wal-fetch prefetch: (\d+) segments prefetched, (\d+) served from the spool; "
                    r"spool removed")


@pytest.fixture(scope="module", autouse=True)
def spool_root() -> Iterator[Path]:
    """A spool root of this module's own (PostgreSQL and the pgvault it runs inherit the variable)."""
    root = make_workdir("pgvault-spool-")
    saved = os.environ.get("PGVAULT_SPOOL_DIR")
    os.environ["PGVAULT_SPOOL_DIR"] = str(root)
    try:
        yield root
    finally:
        if saved is None:
            del os.environ["PGVAULT_SPOOL_DIR"]
        else:
            os.environ["PGVAULT_SPOOL_DIR"] = saved
        for pid in workers(""):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(root)], check=False)


# ---- helpers -------------------------------------------------------------------------------------------

def workers(pgdata: Path | str) -> list[int]:
    """Prefetch workers running for pgdata ("" for any started under this module's spool root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"wal-prefetch" in argv and b"--worker" in argv and str(pgdata).encode() in b" ".join(argv):
                found.append(int(entry.name))
    return found


def as_postgres_in(cwd: Path, config: Path, *args: str) -> Result:
    """pgvault as PostgreSQL runs restore_command: as the database user, in the data directory."""
    proc = subprocess.run(as_db_user([PGVAULT, "--config", str(config), *args]), capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def spool_segments(spool: Path) -> dict[str, int]:
    return prefetch.spooled_segments(spool)


def first_segment(pgdata: Path) -> str:
    """The segment recovery starts with: backup_label's START WAL LOCATION."""
    match = re.search(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", (pgdata / "backup_label").read_text())
    assert match, "no backup_label in the restored data directory"
    return match.group(1)


def prefill(config: Path, pgdata: Path, first: str) -> Path:
    """What PostgreSQL's first restore_command call does, before PostgreSQL starts: fetch the first
    segment (which starts the worker). Returns the spool."""
    dest = pgdata / "pg_wal" / "RECOVERYXLOG"
    result = as_postgres_in(pgdata, config, "wal-fetch", first, "pg_wal/RECOVERYXLOG")
    assert result.returncode == 0, result.out
    dest.unlink()
    return fetch_spool(config, pgdata)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))  # in place: the file keeps its owner


def spool_report(instance: LocalInstance) -> tuple[int, int, str]:
    """(prefetched, served) as recovery_end_command printed them to the server log, and the log."""
    log = instance.log_path.read_text(errors="replace")
    match = REPORT.search(log)
    assert match, f"recovery_end_command printed no prefetch report:\n{instance.log_tail(40)}"
    return int(match.group(1)), int(match.group(2)), log


def assert_cleaned_up(config: Path, instance: LocalInstance) -> None:
    assert not fetch_spool(config, instance.pgdata).exists(), "the spool outlived recovery"
    wait_for(lambda: not workers(instance.pgdata), "the prefetch worker to exit", timeout=10)


def raw_segment(cluster: Cluster, name: str) -> bytes:
    return zstandard.ZstdDecompressor().decompress(cluster.repo.read(LAYOUT.wal_key(name)))


# ---- one history with many segments --------------------------------------------------------------------

@dataclass
class History:
    cluster: Cluster
    marks: Marks
    workdir: Path
    _policies: int = 0

    def policy(self, **restore: Any) -> Path:
        """A policy for this cluster and repository whose restore section is restore."""
        self._policies += 1
        path = self.workdir / f"prefetch-{self._policies}.yaml"
        write_policy(path, "test", self.cluster.pg.conninfo(), self.cluster.repo, restore=restore)
        return path

    def restore(self, config: Path, *flags: str, start: bool = True) -> LocalInstance:
        """Restore with config's policy (its restore_command and recovery_end_command name config)."""
        # Sharing the list of restored copies: the history's teardown stops them, started or not.
        with_policy = Cluster(workdir=self.workdir, pg=self.cluster.pg, config=config, repo=self.cluster.repo,
                              restored=self.cluster.restored)
        pgdata = self.workdir / f"restored-{len(self.cluster.restored) + 1}"
        return with_policy.restore_json(*flags, pgdata=pgdata, start=start)[1]


def commit_and_switch(cluster: Cluster, count: int, rows: int = 5, pause: float = 0.2) -> Marks:
    """Batches with known commit times, each closing its WAL segment: one segment per batch."""
    marks = Marks()
    for _ in range(count):
        mark: Mark = cluster.commit_batch(rows)
        cluster.sql("SELECT pg_switch_wal()")
        marks.items.append(mark)
        time.sleep(pause)
    for mark, following in zip(marks.items, marks.items[1:], strict=False):
        mark.between_next = mark.committed_at + (following.committed_at - mark.committed_at) / 2
    marks.items[-1].between_next = marks.items[-1].committed_at + timedelta(seconds=pause / 2)
    return marks


@pytest.fixture(scope="module")
def history(backend: str) -> Iterator[History]:
    """A backup followed by 14 batches, each in a segment of its own."""
    workdir = make_workdir()
    # No autovacuum: its commits would move the end of the recoverable window past our last batch.
    cluster = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"})
    try:
        cluster.create_table()
        cluster.backup()
        marks = commit_and_switch(cluster, 14)
        cluster.flush_archive()
        yield History(cluster, marks, workdir)
    finally:
        cluster.stop_all()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


# ---- (a) PITR with the spool in use ----------------------------------------------------------------------

def test_pitr_with_prefetch_restores_exactly_the_committed_rows_and_removes_the_spool_at_the_end(
        history: History) -> None:
    config = history.policy(prefetch=8, prefetch_parallel=4)
    target = history.marks[10].between_next.isoformat()
    restored = history.restore(config, "--target-time", target)
    assert rows_of(restored) == history.marks.rows_through(10)
    prefetched, served, _log = spool_report(restored)
    # About 11 segments are replayed; only those asked for before the worker was up are not served.
    assert served >= 3, f"the spool served {served} of {prefetched} prefetched segments"
    assert_cleaned_up(config, restored)


def test_with_prefetch_off_nothing_is_spooled(history: History) -> None:
    config = history.policy(prefetch=0)
    restored = history.restore(config, "--target-time", history.marks[3].between_next.isoformat())
    assert rows_of(restored) == history.marks.rows_through(3)
    assert not REPORT.search(restored.log_path.read_text())
    assert not fetch_spool(config, restored.pgdata).exists()
    assert not workers(restored.pgdata)


# ---- (b) a damaged spooled segment ------------------------------------------------------------------------

def test_a_prefetched_segment_damaged_in_the_spool_is_not_used(history: History) -> None:
    config = history.policy(prefetch=8)
    restored = history.restore(config, start=False)
    first = first_segment(restored.pgdata)
    spool = prefill(config, restored.pgdata, first)
    victim = prefetch.segment_after(first, 2, SEG)
    wait_for(lambda: victim in spool_segments(spool), f"{victim} to be prefetched")
    # A byte of the first record after the page header: replaying this would stop recovery early.
    flip(spool / victim, 100)

    restored.start()
    restored.wait_promoted()
    assert rows_of(restored) == history.marks.rows_through(len(history.marks) - 1)
    _prefetched, served, log = spool_report(restored)
    assert f"{victim}: the prefetched copy does not match its SHA-256" in log
    assert served >= 1
    assert_cleaned_up(config, restored)


# ---- (d) the bound -----------------------------------------------------------------------------------------

class SpoolWatch:
    """Samples a spool every millisecond: the most segment files (spooled, being fetched, being handed
    over) and the most bytes they held at any one sample."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.most_files = 0
        self.most_bytes = 0
        self.at_most: list[str] = []  # the files of the sample with the most
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            names: list[str] = []
            bytes_ = 0
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self.spool):
                    if self.holds_segment(entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            bytes_ += entry.stat().st_size
                            names.append(entry.name)
            if len(names) > self.most_files:
                self.most_files, self.at_most = len(names), sorted(names)
            self.most_bytes = max(self.most_bytes, bytes_)
            self.samples += 1
            time.sleep(0.001)

    @staticmethod
    def holds_segment(name: str) -> bool:
        """A spooled segment, one being fetched (.X.tmp) or one being handed over (.X.take.PID); not
        sidecars nor their temporary files."""
        segment = name.lstrip(".").split(".", 1)[0]
        if not prefetch.is_segment_name(segment):
            return False
        return name in (segment, f".{segment}{prefetch.TMP}") or name.startswith(f".{segment}{prefetch.TAKE}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize(("settings", "most"), [
    ({"prefetch": 8, "prefetch_parallel": 4, "prefetch_max_bytes": "48MiB"}, 3),  # the byte bound: 3 segments
    ({"prefetch": 2, "prefetch_parallel": 4}, 2),  # the count bound
])
def test_the_spool_never_holds_more_than_its_bounds(history: History, settings: dict[str, Any], most: int) -> None:
    config = history.policy(**settings)
    restored = history.restore(config, start=False)
    first = first_segment(restored.pgdata)
    spool = fetch_spool(config, restored.pgdata)
    watch = SpoolWatch(spool)
    try:
        prefill(config, restored.pgdata, first)
        # The archive holds 14 more segments: the window stops at the bound, not at the end.
        wait_for(lambda: len(spool_segments(spool)) == most, f"{most} segments in the spool")
        time.sleep(1)
        assert len(spool_segments(spool)) == most
        restored.start()
        restored.wait_promoted()
    finally:
        watch.stop()
    assert rows_of(restored) == history.marks.rows_through(len(history.marks) - 1)
    assert watch.samples > 100
    assert watch.most_files == most, f"{watch.at_most} at once (bound {most})"
    assert watch.most_bytes <= most * SEG
    _prefetched, served, _log = spool_report(restored)
    assert served >= 1
    assert_cleaned_up(config, restored)


# ---- (e) exit codes with prefetch on ----------------------------------------------------------------------

def test_wal_fetch_exit_codes_hold_with_prefetch_on(history: History) -> None:
    cluster = history.cluster
    config = history.policy(prefetch=4)
    pgdata = history.workdir / "exit-codes"  # restore_command's working directory, as PostgreSQL sets it
    (pgdata / "pg_wal").mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("15\n")
    chown_to_db_user(pgdata)
    spool = fetch_spool(config, pgdata)
    dest = pgdata / "pg_wal" / "RECOVERYXLOG"
    archived = sorted(Layout.wal_name(k) for k in cluster.repo.keys("test/wal/") if k.endswith(".zst"))
    segments = [name for name in archived if prefetch.is_segment_name(name)]
    first, damaged, good, last = segments[2], segments[3], segments[4], segments[-1]
    key = LAYOUT.wal_key(damaged)
    original = cluster.repo.read(key)
    try:
        result = as_postgres_in(pgdata, config, "wal-fetch", first, "pg_wal/RECOVERYXLOG")
        assert (result.returncode, result.out) == (0, "")
        assert dest.read_bytes() == raw_segment(cluster, first)
        dest.unlink()
        wait_for(lambda: {damaged, good} <= set(spool_segments(spool)), "the next segments in the spool")

        # Damaged in the repository and in the spool: the spool's copy is refused, and the full path
        # stops recovery (255) as it always did.
        cluster.repo.write_raw(key, original[:100] + bytes([original[100] ^ 1]) + original[101:])
        flip(spool / damaged, 100)
        result = as_postgres_in(pgdata, config, "wal-fetch", damaged, "pg_wal/RECOVERYXLOG")
        assert result.returncode == 255, result.out
        assert key in result.stderr and "Traceback" not in result.out
        assert not dest.exists(), "wal-fetch wrote something from a damaged object"
        assert damaged not in spool_segments(spool)

        # An intact spooled segment comes from the spool (the fast path), exactly.
        result = as_postgres_in(pgdata, config, "wal-fetch", good, "pg_wal/RECOVERYXLOG")
        assert (result.returncode, result.out) == (0, "")
        assert dest.read_bytes() == raw_segment(cluster, good)
        assert good in (spool / prefetch.SERVED).read_text().split()
        dest.unlink()

        # Not archived: 1, silently, whatever the spool holds; the worker stops at the end.
        after_last = prefetch.segment_after(last, 1, SEG)
        result = as_postgres_in(pgdata, config, "wal-fetch", last, "pg_wal/RECOVERYXLOG")
        assert result.returncode == 0, result.out
        dest.unlink()
        for missing in (after_last, "00000009.history"):
            result = as_postgres_in(pgdata, config, "wal-fetch", missing, "pg_wal/RECOVERYXLOG")
            assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
        assert not dest.exists()
        assert after_last not in spool_segments(spool)
        assert sorted(str(p.relative_to(pgdata)) for p in pgdata.rglob("*")) == ["PG_VERSION", "pg_wal"]
    finally:
        cluster.repo.write_raw(key, original)
        cleaned = as_postgres_in(pgdata, config, "wal-prefetch", "--clean")
    assert cleaned.returncode == 0 and REPORT.search(cleaned.stderr), cleaned.out
    assert not spool.exists()
    wait_for(lambda: not workers(pgdata), "the prefetch worker to exit", timeout=10)


def test_wal_fetch_by_hand_outside_a_data_directory_starts_no_worker(history: History) -> None:
    config = history.policy(prefetch=8)
    elsewhere = history.workdir / "by-hand"
    elsewhere.mkdir()
    chown_to_db_user(elsewhere)
    name = first_segment_of(history)
    result = as_postgres_in(elsewhere, config, "wal-fetch", name, str(elsewhere / "seg"))
    assert result.returncode == 0, result.out
    assert not fetch_spool(config, elsewhere).exists()
    assert not workers(elsewhere)


def first_segment_of(history: History) -> str:
    keys = history.cluster.repo.keys("test/wal/")
    return min(Layout.wal_name(k) for k in keys if prefetch.is_segment_name(Layout.wal_name(k)))


# ---- (c) timelines --------------------------------------------------------------------------------------

def test_a_spooled_segment_of_another_timeline_is_not_used_for_the_one_asked_for(cluster: Cluster) -> None:
    cluster.backup()
    marks = commit_and_switch(cluster, 3)
    cluster.flush_archive()

    # A copy recovered to batch 2 that keeps archiving into the same repository: it promotes onto
    # timeline 2 and writes segments of its own; the original goes on writing on timeline 1, so both
    # timelines have segments with the same numbers.
    copy = cluster.restore_into("--target-time", marks[1].between_next.isoformat(), archive_mode="preserve")
    copy_config = cluster.workdir / "copy.yaml"
    write_policy(copy_config, "test", copy.conninfo(), cluster.repo)
    on_copy = Cluster(workdir=cluster.workdir, pg=copy, config=copy_config, repo=cluster.repo)
    on_copy._batch = 100
    copy_marks = commit_and_switch(on_copy, 3)
    on_copy.flush_archive()
    copy_rows = sorted(marks.rows_through(1) + [r for m in copy_marks.items for r in m.rows])
    commit_and_switch(cluster, 5)
    cluster.flush_archive()

    [switch] = parse_history(cluster.repo.read("test/wal/00000002.history").decode())
    on_two = WalSegment.containing(2, switch.switch_lsn).name  # timeline 2's first segment
    same_on_one = "00000001" + on_two[8:]
    assert cluster.repo.exists(LAYOUT.wal_key(same_on_one)), "timeline 1 did not go on past the switch"

    _result, restored = cluster.restore_json("--target-timeline", "2", start=False)
    # The worker, started as if PostgreSQL had just fetched the segment before the switch, fills
    # the spool with timeline 1's segments from the switch on.
    spool = prefill(cluster.config, restored.pgdata, prefetch.segment_after(same_on_one, -1, SEG))
    wait_for(lambda: same_on_one in spool_segments(spool), f"{same_on_one} in the spool")

    restored.start()
    restored.wait_promoted()
    assert rows_of(restored) == copy_rows
    _prefetched, _served, log = spool_report(restored)
    assert f"window restarts at {on_two}" in log
    assert_cleaned_up(cluster.config, restored)


# ---- S3 faults --------------------------------------------------------------------------------------------

@pytest.mark.s3_only
def test_prefetch_through_a_failing_s3_endpoint_retries_and_restores_exactly(history: History) -> None:
    repo = history.cluster.repo
    assert isinstance(repo, S3Repo)
    with FaultProxy(moto().port, seed=20261127) as proxy:
        flaky = S3Repo(moto(), endpoint=proxy.url, bucket=repo.bucket, prefix=repo.prefix, connect_timeout="1s",
                       read_timeout="3s", retries=12, retry_window="60s")
        config = history.workdir / "prefetch-flaky.yaml"
        write_policy(config, "test", history.cluster.pg.conninfo(), flaky, restore={"prefetch": 8})
        restored = history.restore(config, "--target-time", history.marks[11].between_next.isoformat(),
                                   start=False)
        # GETs fail with 500s, resets and bodies cut off mid-stream; the worker and the full path retry.
        proxy.set_faults(0.25, ("500", "reset", "truncate"))
        restored.start()
        restored.wait_promoted()
        faults = proxy.stats
    assert faults["faults"] > 0, faults
    assert rows_of(restored) == history.marks.rows_through(11)
    _prefetched, served, log = spool_report(restored)
    assert served >= 1
    assert "retrying" in log, "no fault reached the prefetch worker"
    assert_cleaned_up(config, restored)
