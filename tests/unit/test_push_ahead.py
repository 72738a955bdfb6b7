"""wal-push look-ahead without PostgreSQL: archive order, the choice of segments, markers, the fast path's
refusals, spool hygiene, settings, and that the per-call path imports only the standard library.

The fast path is exercised on a directory laid out as pg_wal is (segments, archive_status/*.ready);
tests/integration/test_wal_push_ahead.py runs it under a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault import push_ahead
from pgvault.archive import file_identity
from pgvault.config import parse_policy
from pgvault.errors import ConfigError
from pgvault.push_ahead import (
    archive_order,
    fast_push,
    forget,
    is_segment_name,
    marker_bytes,
    parse_marker,
    prepare_spool,
    read_marker,
    select_look_ahead,
    tidy,
    write_marker,
)
from pgvault.spool import push_spool

SEG = "000000010000000000000003"


def seg(timeline: int, number: int) -> str:
    return f"{timeline:08X}{number >> 8:08X}{number & 0xFF:08X}"


# ---- archive order and selection --------------------------------------------------------------------

def test_archive_order_is_pgarchs_history_files_first_then_lowest_name() -> None:
    names = [seg(2, 5), "00000002.history", seg(1, 7), f"{seg(1, 3)}.00000028.backup", seg(1, 3),
             f"{seg(1, 9)}.partial", "00000003.history", seg(1, 10)]
    assert sorted(names, key=archive_order) == [
        "00000002.history", "00000003.history",
        seg(1, 3), f"{seg(1, 3)}.00000028.backup", seg(1, 7), f"{seg(1, 9)}.partial", seg(1, 10), seg(2, 5)]
    # Not a history file by PostgreSQL's rule (IsTLHistoryFileName): sorted by name with the rest.
    assert archive_order("0000000g.history")[0] == 1 and archive_order("000000001.history")[0] == 1


def test_look_ahead_picks_the_next_ready_segments_in_archive_order() -> None:
    ready = [seg(1, n) for n in (9, 4, 5, 6, 2, 7, 8)] + ["00000002.history", f"{seg(1, 6)}.partial",
                                                          f"{seg(1, 5)}.00000028.backup", seg(2, 1)]
    assert select_look_ahead(ready, seg(1, 4), 3) == [seg(1, 5), seg(1, 6), seg(1, 7)]
    # Never the segment asked for, nothing before it, nothing already marked; history, .partial and
    # .backup files are left to PostgreSQL's own calls.
    assert select_look_ahead(ready, seg(1, 4), 10, skip={seg(1, 6)}) == [seg(1, 5), seg(1, 7), seg(1, 8),
                                                                        seg(1, 9), seg(2, 1)]
    assert select_look_ahead(ready, seg(1, 4), 0) == []
    assert select_look_ahead(ready, seg(2, 1), 8) == []
    # A call for a history file (PostgreSQL archives those first) looks ahead at the oldest segments.
    assert select_look_ahead(ready, "00000002.history", 2) == [seg(1, 2), seg(1, 4)]


names = st.builds(seg, st.integers(1, 3), st.integers(0, 600))


@given(st.lists(names | st.sampled_from(["00000002.history", f"{SEG}.partial"]), max_size=40), names,
       st.integers(-1, 12), st.sets(names, max_size=10))
def test_look_ahead_choice_properties(ready: list[str], current: str, limit: int, skip: set[str]) -> None:
    chosen = select_look_ahead(ready, current, limit, skip)
    assert len(chosen) <= max(limit, 0) and len(set(chosen)) == len(chosen)
    assert chosen == sorted(chosen, key=archive_order)
    assert all(is_segment_name(n) and n in ready and n not in skip and n > current for n in chosen)
    # The oldest eligible ones: nothing left out comes before the last one chosen.
    eligible = sorted({n for n in ready if is_segment_name(n) and n not in skip and n > current})
    assert chosen == eligible[: max(limit, 0)]


def test_segment_names() -> None:
    assert is_segment_name(SEG) and is_segment_name("0000000A00000000000000FF")
    for name in ("0000000a00000000000000ff", SEG[:-1], f"{SEG}.partial", "00000002.history", f"{SEG}.00000028.backup",
                 "../" + SEG[3:], ""):
        assert not is_segment_name(name), name


# ---- markers ----------------------------------------------------------------------------------------

def marker_for(name: str, data: bytes, wal_dir: Path, policy: Path) -> bytes:
    return marker_bytes(name, len(data), hashlib.sha256(data).hexdigest(), os.path.realpath(wal_dir),
                        push_ahead.policy_digest(policy), time.time())


def test_parse_marker_refuses_anything_but_a_well_formed_marker_for_that_name() -> None:
    good = json.loads(marker_bytes(SEG, 16, "a" * 64, "/w", "b" * 64, 1.0))
    assert parse_marker(json.dumps(good).encode(), SEG) == good
    for change in ({"name": seg(1, 4)}, {"v": 2}, {"size": 0}, {"size": "16"}, {"size": True},
                   {"raw_sha256": "a" * 63}, {"raw_sha256": None}, {"wal_dir": None}, {"policy_sha256": 1}):
        assert parse_marker(json.dumps({**good, **change}).encode(), SEG) is None, change
    assert parse_marker(b"{", SEG) is None and parse_marker(b"[]", SEG) is None
    assert parse_marker(json.dumps({k: v for k, v in good.items() if k != "size"}).encode(), SEG) is None


def test_markers_are_written_atomically_private_and_read_only_when_private(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    assert prepare_spool(str(spool))
    data = marker_bytes(SEG, 16, "a" * 64, "/w", "b" * 64, 1.0)
    write_marker(str(spool), SEG, data)
    assert (spool / SEG).read_bytes() == data and (spool / SEG).stat().st_mode & 0o777 == 0o600
    assert os.listdir(spool) == [SEG]  # no temporary file left
    assert read_marker(str(spool), SEG) == json.loads(data)
    assert read_marker(str(spool), seg(1, 4)) is None

    (spool / SEG).chmod(0o644)  # readable (so writable by a group?) marker: not trusted
    assert read_marker(str(spool), SEG) is None
    (spool / SEG).chmod(0o600)
    spool.chmod(0o755)
    assert read_marker(str(spool), SEG) is None
    spool.chmod(0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(data)
    elsewhere.chmod(0o600)
    (spool / seg(1, 4)).symlink_to(elsewhere)
    assert read_marker(str(spool), seg(1, 4)) is None  # O_NOFOLLOW
    forget(str(spool), SEG)
    forget(str(spool), SEG)  # gone already: not an error
    assert not (spool / SEG).exists()


def test_prepare_spool_creates_each_level_0700_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = tmp_path / "root" / "push" / "abc"
        assert prepare_spool(str(spool))
    finally:
        os.umask(old)
    for level in (tmp_path / "root", tmp_path / "root" / "push", spool):
        assert level.stat().st_mode & 0o777 == 0o700, level
    spool.chmod(0o755)  # ours, opened up by hand: closed again
    assert prepare_spool(str(spool)) and spool.stat().st_mode & 0o777 == 0o700
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not prepare_spool(str(blocker / "push" / "abc"))


def test_tidy_removes_markers_of_segments_no_longer_ready_old_markers_and_stale_temporaries(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    assert prepare_spool(str(spool))
    now = time.time()
    names = {n: seg(1, n) for n in range(1, 7)}
    for name in names.values():
        write_marker(str(spool), name, b"{}")
    day_old = now - push_ahead.MARKER_MAX_AGE - 60
    os.utime(spool / names[2], (day_old, day_old))
    for tmp, age in ((f".tmp.{names[5]}.1", push_ahead.TMP_MAX_AGE + 60), (f".tmp.{names[6]}.2", 10)):
        (spool / tmp).write_bytes(b"")
        os.utime(spool / tmp, (now - age, now - age))
    (spool / "README").write_text("not ours")
    ready = {names[1], names[2], names[4], names[5]}  # 3 and 6 went .done (or were removed)
    assert tidy(str(spool), ready, now=now) == 4
    assert sorted(os.listdir(spool)) == sorted([f".tmp.{names[6]}.2", "README", names[1], names[4], names[5]])


def test_tidy_looks_at_a_bounded_number_of_entries(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    assert prepare_spool(str(spool))
    for n in range(50):
        write_marker(str(spool), seg(1, n), b"{}")
    assert tidy(str(spool), set(), now=time.time(), budget=20) == 20
    assert len(os.listdir(spool)) == 30


# ---- the fast path ----------------------------------------------------------------------------------

class Layout:
    """A data directory's pg_wal as the fast path sees it, a policy file and a private spool root."""

    def __init__(self, root: Path) -> None:
        self.pg_wal = root / "pgdata" / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)
        self.policy = root / "policy.yaml"
        self.policy.write_text("cluster: main\n")
        self.spool = push_spool(str(self.policy))

    def segment(self, name: str, data: bytes, *, ready: bool = True) -> Path:
        (self.pg_wal / name).write_bytes(data)
        if ready:
            (self.pg_wal / "archive_status" / f"{name}.ready").write_text("")
        return self.pg_wal / name

    def mark(self, name: str, data: bytes, **change: object) -> None:
        assert prepare_spool(str(self.spool))
        marker = {**json.loads(marker_for(name, data, self.pg_wal, self.policy)), **change}
        write_marker(str(self.spool), name, json.dumps(marker).encode())


@pytest.fixture
def wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Layout]:
    monkeypatch.setenv("PGVAULT_SPOOL_DIR", str(tmp_path / "spool-root"))
    yield Layout(tmp_path)


DATA = os.urandom(64 * 1024)


def test_fast_path_answers_for_a_marked_segment_with_exactly_that_content(wal: Layout,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = wal.segment(SEG, DATA)
    wal.mark(SEG, DATA)
    assert fast_push(str(wal.policy), [str(path)]) == 0
    assert not (wal.spool / SEG).exists()  # used once
    assert fast_push(str(wal.policy), [str(path)]) is None  # no marker: the full path decides
    # Relative to the data directory, as PostgreSQL passes %p.
    wal.mark(SEG, DATA)
    monkeypatch.chdir(wal.pg_wal.parent)
    assert fast_push(str(wal.policy), [f"pg_wal/{SEG}"]) == 0
    # .ready stays: PostgreSQL renames it after our exit 0.
    assert (wal.pg_wal / "archive_status" / f"{SEG}.ready").exists()


def test_fast_path_refuses_content_other_than_what_was_pushed(wal: Layout) -> None:
    other = bytearray(DATA)
    other[len(other) // 2] ^= 1
    path = wal.segment(SEG, bytes(other))
    wal.mark(SEG, DATA)
    assert fast_push(str(wal.policy), [str(path)]) is None
    assert (wal.spool / SEG).exists()  # left for the full path, which removes it
    path.write_bytes(DATA + b"x")
    assert fast_push(str(wal.policy), [str(path)]) is None
    path.write_bytes(DATA)
    wal.mark(SEG, DATA, raw_sha256=hashlib.sha256(b"something else").hexdigest())
    assert fast_push(str(wal.policy), [str(path)]) is None
    wal.mark(SEG, DATA, size=len(DATA) + 1)
    assert fast_push(str(wal.policy), [str(path)]) is None
    wal.mark(SEG, DATA)
    (wal.spool / SEG).write_bytes(b"{garbage")
    assert fast_push(str(wal.policy), [str(path)]) is None


def test_the_file_as_pushed_is_recognised_without_a_re_hash_and_any_change_goes_back_to_the_hash(
        wal: Layout) -> None:
    path = wal.segment(SEG, DATA)
    identity = file_identity(os.stat(path))
    # A marker whose checksum is wrong but whose identity is the file's: answered from the identity
    # alone (this is what proves the 16 MiB are not hashed again).
    wal.mark(SEG, DATA, raw_sha256="0" * 64, identity=list(identity))
    assert fast_push(str(wal.policy), [str(path)]) == 0
    # Rewritten in place with other bytes of the same size: mtime and ctime move, the hash decides.
    other = bytearray(DATA)
    other[7] ^= 1
    time.sleep(0.01)  # past the file system's timestamp granularity
    path.write_bytes(bytes(other))
    wal.mark(SEG, DATA, identity=list(identity))
    assert fast_push(str(wal.policy), [str(path)]) is None
    # Another file with the marker's content put in its place: another inode, the hash decides (same bytes).
    replacement = wal.pg_wal / "replacement"
    replacement.write_bytes(DATA)
    os.replace(replacement, path)
    wal.mark(SEG, DATA, identity=list(identity))
    assert fast_push(str(wal.policy), [str(path)]) == 0
    # A chmod moves ctime only: the hash confirms the same content.
    identity = file_identity(os.stat(path))
    time.sleep(0.01)
    os.chmod(path, 0o640)
    assert file_identity(os.stat(path)) != identity
    wal.mark(SEG, DATA, identity=list(identity))
    assert fast_push(str(wal.policy), [str(path)]) == 0
    # A malformed identity makes the marker not a marker.
    wal.mark(SEG, DATA, identity=[1, 2, 3])
    assert fast_push(str(wal.policy), [str(path)]) is None


def test_push_reports_the_identity_of_the_file_it_read(tmp_path: Path) -> None:
    from pgvault.archive import push
    from pgvault.repo.file import FileStorage
    from pgvault.repo.layout import Layout as RepoLayout

    segment = tmp_path / "000000010000000000000001"
    size = 1024 * 1024  # PostgreSQL allows 1 MiB segments; keeps this light
    # XLogLongPageHeaderData: magic, info (XLP_LONG_HEADER), tli, pageaddr, rem_len, pad, sysid, seg size, blcksz
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, size, 0, 7, size, 8192)
    segment.write_bytes(header + b"\x01" * (size - len(header)))
    result = push(FileStorage(tmp_path / "repo"), RepoLayout("main"), segment, system_id="7", segment_size=size,
                  level=1)
    assert result.identity == file_identity(os.stat(segment))
    again = push(FileStorage(tmp_path / "repo"), RepoLayout("main"), segment, system_id="7", segment_size=size,
                 level=1)
    assert again.outcome == "already archived" and again.identity == result.identity


def test_fast_path_refuses_a_changed_policy_another_wal_directory_and_a_segment_not_ready(
        wal: Layout, tmp_path: Path) -> None:
    path = wal.segment(SEG, DATA)
    wal.mark(SEG, DATA)
    wal.policy.write_text("cluster: main\nrepository: {url: 'file:///elsewhere'}\n")
    assert fast_push(str(wal.policy), [str(path)]) is None  # the marker stood for the old repository
    wal.policy.write_text("cluster: main\n")
    assert fast_push(str(wal.policy), [str(path)]) == 0

    copy = tmp_path / "copy" / "pg_wal"
    (copy / "archive_status").mkdir(parents=True)
    (copy / SEG).write_bytes(DATA)
    (copy / "archive_status" / f"{SEG}.ready").write_text("")
    wal.mark(SEG, DATA)
    assert fast_push(str(wal.policy), [str(copy / SEG)]) is None  # marked for another pg_wal

    (wal.pg_wal / "archive_status" / f"{SEG}.ready").rename(wal.pg_wal / "archive_status" / f"{SEG}.done")
    assert fast_push(str(wal.policy), [str(path)]) is None  # not PostgreSQL asking for a queued segment


def test_fast_path_answers_only_for_complete_segments_with_one_argument(wal: Layout) -> None:
    for name in (f"{SEG}.partial", "00000002.history", f"{SEG}.00000028.backup"):
        path = wal.segment(name, DATA)
        # Even a marker planted under that name is not looked at.
        assert prepare_spool(str(wal.spool))
        write_marker(str(wal.spool), name, marker_for(name, DATA, wal.pg_wal, wal.policy))
        assert fast_push(str(wal.policy), [str(path)]) is None, name
    path = wal.segment(SEG, DATA)
    wal.mark(SEG, DATA)
    assert fast_push(str(wal.policy), []) is None
    assert fast_push(str(wal.policy), [str(path), str(path)]) is None
    assert fast_push(str(wal.policy), [str(path)]) == 0


def test_the_per_call_path_imports_only_the_standard_library(wal: Layout) -> None:
    path = wal.segment(SEG, DATA)
    wal.mark(SEG, DATA)
    probe = ("import sys\nfrom pgvault.entry import parse_fast\nfrom pgvault.push_ahead import fast_push\n"
             f"code = fast_push({str(wal.policy)!r}, [{str(path)!r}])\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
             "{'click', 'pydantic', 'yaml', 'boto3', 'botocore', 'zstandard', 'psycopg', 'typing', 'dataclasses',"
             " 'pathlib', 'contextlib'})\n"
             "print(code, heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ})
    assert done.stdout.strip() == "0 []", done.stdout + done.stderr


# ---- settings -----------------------------------------------------------------------------------------

def minimal(**archive: object) -> dict[str, object]:
    return {"cluster": "main", "postgres": {"conninfo": "host=/tmp"}, "repository": {"url": "file:///srv/r"},
            "archive": archive}


def test_look_ahead_settings_default_and_ranges() -> None:
    policy = parse_policy(minimal(), "p.yaml")
    assert policy.archive.look_ahead == 8 and policy.archive.push_parallel == 4
    off = parse_policy(minimal(look_ahead=0, push_parallel=1), "p.yaml")
    assert off.archive.look_ahead == 0 and off.archive.push_parallel == 1
    for bad in ({"look_ahead": -1}, {"look_ahead": 65}, {"push_parallel": 0}, {"push_parallel": 17},
                {"look_ahead": "8"}, {"push_parallel": 2.5}):
        with pytest.raises(ConfigError) as caught:
            parse_policy(minimal(**bad), "p.yaml")
        assert "archive." in caught.value.message and "\n" not in caught.value.message, caught.value.message
