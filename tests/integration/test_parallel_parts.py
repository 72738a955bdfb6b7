"""Backups of many parts, uploaded while the stream goes on, restored in parallel, on both backends.

- a backup of some tens of parts (part_size 1MiB) restores exactly the rows committed up to a target
  time between two batches, with -q silent;
- a damaged part fails the restore, naming it, before anything is written;
- the upload of a part really overlaps the reading of the next one (observed, see
  test_uploads_overlap_the_reading_of_the_next_part), and an upload failing mid-backup fails the
  backup cleanly;
- the pipe between the stream and an upload: bytes in order, memory bounded, the rest spilled.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, make_workdir, new_cluster, rows_of, write_policy
from repos import flip_byte

from pgvault.pg.instance import LocalInstance, as_db_user
from pgvault.repo.layout import Layout
from pgvault.streams import PipeClosed, SpoolPipe

pytestmark = [pytest.mark.integration]

CLUSTER = "test"  # new_cluster's default cluster name
LAYOUT = Layout(CLUSTER)
PYTHON = str(Path(sys.executable).parent.resolve() / "python")
BIG_ROWS = 200_000  # ~14 MiB of table: with the catalogs, some 30 parts of 1 MiB


@pytest.fixture(scope="module")
def many(backend: str) -> Iterator[Cluster]:
    """A cluster whose backups have tens of parts, uploaded 3 at a time and restored 3 at a time."""
    workdir = make_workdir()
    made = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"},
                       backup={"part_size": "1MiB", "upload_parallel": 3}, restore={"parallel": 3})
    try:
        made.create_table()
        made.sql(f"CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, {BIG_ROWS}) g")
        made.flush_archive()
        yield made
    finally:
        made.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def big_digest(instance: LocalInstance) -> str:
    return str(instance.query("SELECT count(*) || ':' || md5(string_agg(h, ',' ORDER BY g)) FROM big")[0][0])


def backup_record(cluster: Cluster, *flags: str) -> tuple[dict[str, Any], str]:
    """backup --json: the record, and what it printed on stderr."""
    result = cluster.pgvault(*flags, "backup", "--json")
    assert result.returncode == 0, result.out
    return json.loads(result.stdout), result.stderr


# ---- a backup of many parts, restored in parallel ----------------------------------------------------

def test_a_backup_of_many_parts_restores_exactly_the_rows_committed_before_the_target(many: Cluster) -> None:
    before = many.commit_batches(2, pause=0.3)
    record, stderr = backup_record(many, "-q")
    assert stderr == "", "backup -q printed something"
    parts = record["parts"]
    assert len(parts) >= 10, f"only {len(parts)} parts: the test needs a backup of many parts"
    # Uploads finish in any order; the sentinel lists the parts by index, each under its own key.
    assert [p["index"] for p in parts] == list(range(len(parts)))
    assert [p["key"] for p in parts] == [LAYOUT.part_key(record["id"], i) for i in range(len(parts))]

    marks = many.commit_batches(4, pause=0.4)
    many.flush_archive()
    pgdata = many.next_restore_dir()
    result = many.pgvault("-q", "restore", "--pgdata", str(pgdata), "--archive-mode", "off",
                          "--backup", record["id"], "--target-time", marks[1].between_next.isoformat())
    assert result.returncode == 0, result.out
    assert result.stderr == "", "restore -q printed something"
    restored = LocalInstance.existing(pgdata)
    many.restored.append(restored)
    restored.start()
    restored.wait_promoted()
    assert rows_of(restored) == marks.rows_through(1, before.rows_through(len(before) - 1))
    assert big_digest(restored) == big_digest(many.pg)
    restored.destroy()


def test_backup_reports_each_part_stored_in_index_order_as_timestamped_lines(many: Cluster) -> None:
    record, stderr = backup_record(many)
    lines = stderr.splitlines()
    assert lines and all(re.match(r"\d\d:\d\d:\d\d \S", line) for line in lines), stderr
    stored = [int(m[1]) for line in lines if (m := re.search(r": part (\d+) of \S+ stored \(", line))]
    assert stored == list(range(len(record["parts"]))), stderr


def test_a_damaged_part_fails_the_restore_naming_it_before_anything_is_written(many: Cluster) -> None:
    record, _ = backup_record(many, "-q")
    # A part in the middle: restore verifies the biggest parts first, and extracts in that order too.
    damaged = record["parts"][len(record["parts"]) // 2]["key"]
    flip_byte(many.repo, damaged)

    missing = many.workdir / "restore-damaged-part"
    result = many.pgvault("restore", "--pgdata", str(missing), "--backup", record["id"])
    assert result.returncode == 1, result.out
    assert damaged in result.stderr and "Traceback" not in result.out, result.out
    assert not missing.exists()

    empty = many.db_user_dir("restore-damaged-part-empty")
    result = many.pgvault("restore", "--pgdata", str(empty), "--backup", record["id"])
    assert result.returncode == 1, result.out
    assert damaged in result.stderr
    assert list(empty.iterdir()) == []


# ---- uploads overlap the stream ----------------------------------------------------------------------
#
# How it is observed: pgvault's own CLI runs in a subprocess (as the database user, like every test here)
# with two wrappers installed first. One times every chunk of the server's stream as pgvault reads it
# (BaseBackupSession._next_data). The other times the start and end of every part's put() and makes the
# upload slow, 50 ms per read of the part's data, like a slow link (the storage itself is the real
# backend). The upload of part i overlaps the reading of part i+1 exactly when stream chunks were read
# after part i+1's put started and before part i's put ended. With upload_parallel: 1 that window is
# always empty, which shows the observation can tell the two apart.

_OBSERVED_BACKUP = """
import json, sys, threading, time
from pathlib import Path
from pgvault import cli
from pgvault.errors import RepositoryError
from pgvault.pg import basebackup
from pgvault.repo.file import FileStorage
from pgvault.repo.s3 import S3Storage

events_path = Path(sys.argv.pop(1))
fail_part = sys.argv.pop(1)  # a part key suffix whose upload fails after its first read, or "-"
events, lock = [], threading.Lock()

def note(kind, key=""):
    with lock:
        events.append((time.monotonic(), kind, key))

real_next_data = basebackup.BaseBackupSession._next_data
def next_data(self):
    data = real_next_data(self)
    if data:
        note("read")
    return data
basebackup.BaseBackupSession._next_data = next_data

class Slow:
    def __init__(self, data, key):
        self.data, self.key, self.reads = data, key, 0
    def read(self, size=-1):
        time.sleep(0.05)
        self.reads += 1
        if self.key.endswith(fail_part) and self.reads > 1:
            raise RepositoryError(f"injected failure storing {self.key}")
        return self.data.read(size)

def slowed(real_put):
    def put(self, key, data, **kwargs):
        if "/part-" not in key:
            return real_put(self, key, data, **kwargs)
        note("put-start", key)
        try:
            return real_put(self, key, Slow(data, key), **kwargs)
        finally:
            note("put-end", key)
    return put

for storage in (FileStorage, S3Storage):
    storage.put = slowed(storage.put)
try:
    cli.main()
finally:
    events_path.write_text(json.dumps(events))
"""


def observed_backup(cluster: Cluster, upload_parallel: int, *, fail_part: str = "-") -> tuple[
        subprocess.CompletedProcess[str], list[tuple[float, str, str]]]:
    policy = cluster.workdir / f"observed-{upload_parallel}.yaml"
    write_policy(policy, CLUSTER, cluster.pg.conninfo(), cluster.repo,
                 backup={"part_size": "1MiB", "upload_parallel": upload_parallel})
    events = cluster.workdir / f"events-{upload_parallel}-{'ok' if fail_part == '-' else 'failing'}.json"
    proc = subprocess.run(as_db_user([PYTHON, "-c", _OBSERVED_BACKUP, str(events), fail_part, "--config",
                                      str(policy), "-q", "backup"]),
                          capture_output=True, text=True, cwd="/tmp", timeout=300, check=False)
    return proc, [tuple(e) for e in json.loads(events.read_text())]


def overlapped_reads(events: list[tuple[float, str, str]]) -> dict[int, int]:
    """For each part i: how many stream chunks were read while part i was still being uploaded and
    part i+1's upload had already started (so those chunks belong to part i+1 or later)."""
    start = {key: t for t, kind, key in events if kind == "put-start"}
    end = {key: t for t, kind, key in events if kind == "put-end"}
    reads = [t for t, kind, _ in events if kind == "read"]
    keys = sorted(start)
    counts = {}
    for i, (this, following) in enumerate(itertools.pairwise(keys)):
        counts[i] = sum(1 for t in reads if start[following] < t < end[this])
    return counts


def test_uploads_overlap_the_reading_of_the_next_part(many: Cluster) -> None:
    proc, events = observed_backup(many, upload_parallel=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    overlaps = overlapped_reads(events)
    assert len(overlaps) >= 10, overlaps
    # Most parts' uploads saw the stream go on (a part too small to outlast its successor's reading
    # may not): reading did not wait for uploads.
    assert sum(1 for n in overlaps.values() if n) >= len(overlaps) // 2, overlaps

    proc, events = observed_backup(many, upload_parallel=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(overlapped_reads(events).values()), overlapped_reads(events)
    start = {key: t for t, kind, key in events if kind == "put-start"}
    end = {key: t for t, kind, key in events if kind == "put-end"}
    keys = sorted(start)
    assert all(end[a] <= start[b] for a, b in itertools.pairwise(keys)), "uploads ran at once"


def test_an_upload_failing_mid_backup_fails_it_cleanly_and_the_next_backup_removes_its_parts(
        many: Cluster) -> None:
    listed = {b["id"] for b in json.loads(many.ok("-q", "list", "--json").stdout)["backups"]}
    proc, events = observed_backup(many, upload_parallel=3, fail_part="/part-00004.tar.zst")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "injected failure storing" in proc.stderr and "part-00004" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = next(key for _, kind, key in events if kind == "put-start").split("/")[-2]
    # Uploads still going were stopped and cleaned up like a killed writer's: no temp files, no
    # unfinished multipart uploads; stored parts stay, as debris without a sentinel.
    assert many.repo.debris(LAYOUT.backup_prefix(failed)) == []
    assert not many.repo.exists(LAYOUT.sentinel_key(failed))
    assert not any(key.startswith(LAYOUT.backup_prefix(failed)) and "/part-0000" not in key
                   for key in many.repo.keys(LAYOUT.backup_prefix(failed)))
    assert {b["id"] for b in json.loads(many.ok("-q", "list", "--json").stdout)["backups"]} == listed

    many.backup()
    assert many.repo.keys(LAYOUT.backup_prefix(failed)) == []


# ---- the pipe between the stream and an upload (no server needed) -----------------------------------

def test_spool_pipe_hands_over_every_byte_in_order_within_its_memory_limit() -> None:
    rng = random.Random(6)
    pieces = [rng.randbytes(rng.randrange(1, 300_000)) for _ in range(200)]
    pipe = SpoolPipe(memory_limit=1_000_000)
    received = bytearray()

    def reader() -> None:
        while data := pipe.read(rng.choice([1, 4096, 1 << 20, -1])):
            received.extend(data)

    thread = threading.Thread(target=reader)
    thread.start()
    for piece in pieces:
        pipe.write(piece)
    pipe.close()
    thread.join(30)
    assert bytes(received) == b"".join(pieces)
    assert pipe.peak_memory <= 1_000_000


def test_spool_pipe_spills_what_a_slow_reader_has_not_taken_yet() -> None:
    pipe = SpoolPipe(memory_limit=100_000)
    data = [bytes([i]) * 60_000 for i in range(10)]
    for piece in data:  # nobody reads yet: the writer must not wait
        pipe.write(piece)
    pipe.close()
    assert pipe.peak_memory <= 100_000 and pipe.spilled == 540_000
    out = bytearray()
    while chunk := pipe.read(70_000):
        out.extend(chunk)
    assert bytes(out) == b"".join(data)
    pipe.abandon()


def test_spool_pipe_failure_of_either_end_reaches_the_other() -> None:
    pipe = SpoolPipe(memory_limit=10)
    pipe.write(b"abc")
    pipe.fail(RuntimeError("stream broke"))
    with pytest.raises(PipeClosed, match="stream broke"):
        pipe.read(3)

    pipe = SpoolPipe(memory_limit=10)
    pipe.abandon()  # the upload gave up
    with pytest.raises(PipeClosed):
        pipe.write(b"more")

