"""FileStorage, the local-directory repository backend: put/open/head/list/delete, no-overwrite
publishing that holds under concurrent writers, checksums that always match the bytes, no temp debris.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pgvault.errors import ObjectExists, ObjectNotFound, RepositoryError
from pgvault.repo.file import META_SUFFIX, TMP_PREFIX, FileStorage


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(storage: FileStorage, key: str) -> bytes:
    handle, _meta = storage.open(key)
    with handle:
        return handle.read()


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _temp_files(root: Path) -> list[str]:
    return [name for name in _all_files(root) if Path(name).name.startswith(TMP_PREFIX)]


def _assert_consistent(root: Path, key: str) -> dict:
    """The object and its sidecar agree: size and SHA-256 of the bytes actually stored."""
    data = (root / key).read_bytes()
    sidecar = json.loads((root / (key + META_SUFFIX)).read_bytes())
    assert sidecar["size"] == len(data)
    assert sidecar["sha256"] == _sha(data)
    return sidecar


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "repo")


# ---- the basics -----------------------------------------------------------------------------------

def test_put_then_open_head_returns_bytes_and_checksum(storage: FileStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one internal chunk
    meta = storage.put("c/wal/0000000100000000/seg.zst", io.BytesIO(data), extra={"raw_sha256": "abc"})
    assert meta.size == len(data)
    assert meta.sha256 == _sha(data)
    assert dict(meta.extra) == {"raw_sha256": "abc"}

    handle, opened = storage.open("c/wal/0000000100000000/seg.zst")
    with handle:
        assert handle.read() == data
    assert (opened.size, opened.sha256, dict(opened.extra)) == (len(data), _sha(data), {"raw_sha256": "abc"})

    head = storage.head("c/wal/0000000100000000/seg.zst")
    assert head is not None
    assert (head.size, head.sha256, dict(head.extra)) == (len(data), _sha(data), {"raw_sha256": "abc"})

    sidecar = _assert_consistent(storage.root, "c/wal/0000000100000000/seg.zst")
    assert sidecar["extra"] == {"raw_sha256": "abc"}
    # Plain files: readable with ordinary tools.
    assert (storage.root / "c/wal/0000000100000000/seg.zst").read_bytes() == data


def test_empty_object(storage: FileStorage) -> None:
    meta = storage.put("c/empty", io.BytesIO(b""))
    assert (meta.size, meta.sha256) == (0, _sha(b""))
    assert _read(storage, "c/empty") == b""


def test_missing_objects(storage: FileStorage) -> None:
    assert storage.head("c/nothing") is None
    with pytest.raises(ObjectNotFound, match="c/nothing"):
        storage.open("c/nothing")
    assert list(storage.list("c/")) == []  # the root does not even exist yet
    storage.delete(["c/nothing"])  # missing keys are not an error


@pytest.mark.parametrize("key", ["/etc/passwd", "../outside", "c/../../outside", "c/x/../../../y"])
def test_keys_cannot_escape_the_root(storage: FileStorage, key: str) -> None:
    with pytest.raises(RepositoryError, match="invalid object key"):
        storage.put(key, io.BytesIO(b"evil"))
    with pytest.raises(RepositoryError, match="invalid object key"):
        storage.head(key)
    assert not (storage.root.parent / "outside").exists()


def test_head_of_object_whose_sidecar_is_not_yet_written_describes_its_bytes(storage: FileStorage) -> None:
    # A writer killed between publishing the data and renaming its sidecar leaves this state.
    storage.put("c/obj", io.BytesIO(b"complete data"))
    (storage.root / ("c/obj" + META_SUFFIX)).unlink()
    meta = storage.head("c/obj")
    assert meta is not None
    assert (meta.size, meta.sha256) == (len(b"complete data"), _sha(b"complete data"))


def test_sidecar_without_its_data_is_no_object_and_a_new_put_heals_it(storage: FileStorage) -> None:
    # The data file deleted (by hand, by damage) while its sidecar stayed: nothing is stored under the
    # key, so head/open say so and a writer (wal-push re-archiving from pg_wal) may publish it again.
    storage.put("c/obj", io.BytesIO(b"old bytes"))
    (storage.root / "c/obj").unlink()
    assert storage.head("c/obj") is None
    with pytest.raises(ObjectNotFound):
        storage.open("c/obj")
    meta = storage.put("c/obj", io.BytesIO(b"new bytes"))
    assert (meta.size, meta.sha256) == (len(b"new bytes"), _sha(b"new bytes"))
    assert _read(storage, "c/obj") == b"new bytes"
    assert _assert_consistent(storage.root, "c/obj")["sha256"] == _sha(b"new bytes")


# ---- no overwrite ---------------------------------------------------------------------------------

def test_put_without_overwrite_raises_and_leaves_object_unchanged(storage: FileStorage) -> None:
    storage.put("c/obj", io.BytesIO(b"first"), extra={"v": "1"})
    path = storage.root / "c/obj"
    before = (path.read_bytes(), (storage.root / "c/obj.meta").read_bytes(), path.stat().st_ino)

    with pytest.raises(ObjectExists, match="c/obj"):
        storage.put("c/obj", io.BytesIO(b"second, different"), extra={"v": "2"})
    with pytest.raises(ObjectExists):
        storage.put("c/obj", io.BytesIO(b"first"))  # even identical content: callers decide idempotency

    assert (path.read_bytes(), (storage.root / "c/obj.meta").read_bytes(), path.stat().st_ino) == before
    assert _read(storage, "c/obj") == b"first"
    assert _temp_files(storage.root) == []


def test_overwrite_replaces_object_and_sidecar(storage: FileStorage) -> None:
    storage.put("c/obj", io.BytesIO(b"first"), extra={"v": "1"})
    meta = storage.put("c/obj", io.BytesIO(b"second, longer"), extra={"v": "2"}, overwrite=True)
    assert (meta.size, meta.sha256) == (len(b"second, longer"), _sha(b"second, longer"))
    assert _read(storage, "c/obj") == b"second, longer"
    head = storage.head("c/obj")
    assert head is not None and dict(head.extra) == {"v": "2"}
    _assert_consistent(storage.root, "c/obj")
    assert _all_files(storage.root) == ["c/obj", "c/obj.meta"]


def test_overwrite_of_missing_key_creates_it(storage: FileStorage) -> None:
    storage.put("c/new", io.BytesIO(b"x"), overwrite=True)
    assert _read(storage, "c/new") == b"x"


# ---- concurrent writers of one key ----------------------------------------------------------------

def _put_racer(root: str, key: str, content: bytes, start: Callable[[], object]) -> str:
    storage = FileStorage(Path(root))
    start()
    try:
        storage.put(key, io.BytesIO(content), extra={"writer": _sha(content)})
    except ObjectExists:
        return "lost"
    return "won"


def _process_racer(root: str, key: str, content: bytes, barrier: object, results: object) -> None:
    results.put((content, _put_racer(root, key, content, barrier.wait)))  # type: ignore[attr-defined]


def _check_one_winner(root: Path, key: str, outcomes: list[tuple[bytes, str]]) -> None:
    winners = [content for content, outcome in outcomes if outcome == "won"]
    assert len(winners) == 1, f"expected exactly one winner, got {len(winners)}"
    assert sorted(outcome for _content, outcome in outcomes).count("lost") == len(outcomes) - 1
    stored = (root / key).read_bytes()
    assert stored == winners[0], "the stored bytes are not the winner's"
    sidecar = _assert_consistent(root, key)
    assert sidecar["extra"] == {"writer": _sha(winners[0])}, "the sidecar belongs to a loser"
    leftovers = [name for name in os.listdir((root / key).parent) if name.startswith(TMP_PREFIX)]
    assert leftovers == [], f"temp files left: {leftovers}"


def test_concurrent_puts_from_threads_have_exactly_one_winner(storage: FileStorage) -> None:
    writers = 8
    for round_ in range(15):
        key = f"c/wal/race-{round_}"
        contents = [f"writer {i} ".encode() * (1000 + 997 * i) for i in range(writers)]
        barrier = threading.Barrier(writers)
        outcomes: list[tuple[bytes, str]] = []
        lock = threading.Lock()

        def run(content: bytes, key: str, barrier: threading.Barrier, outcomes: list[tuple[bytes, str]],
                lock: threading.Lock) -> None:
            outcome = _put_racer(str(storage.root), key, content, barrier.wait)
            with lock:
                outcomes.append((content, outcome))

        threads = [threading.Thread(target=run, args=(c, key, barrier, outcomes, lock)) for c in contents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(outcomes) == writers
        _check_one_winner(storage.root, key, outcomes)


def test_concurrent_puts_from_processes_have_exactly_one_winner(storage: FileStorage) -> None:
    ctx = multiprocessing.get_context("fork")
    writers = 6
    storage.root.mkdir(parents=True)
    for round_ in range(6):
        key = f"c/wal/0000000100000000/proc-race-{round_}"
        contents = [os.urandom(64 * 1024 + 4099 * i) for i in range(writers)]
        barrier = ctx.Barrier(writers)
        results = ctx.Queue()
        procs = [ctx.Process(target=_process_racer, args=(str(storage.root), key, c, barrier, results))
                 for c in contents]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        _check_one_winner(storage.root, key, outcomes)


# ---- list, delete, debris -------------------------------------------------------------------------

def test_list_returns_objects_in_key_order_and_skips_temp_and_meta_files(storage: FileStorage) -> None:
    keys = ["c/wal/00000002.history", "c/wal/0000000100000000/000000010000000000000002.zst",
            "c/wal/0000000100000000/000000010000000000000001.zst", "c/backups/b1/part-00000.tar.zst",
            "c/backups/b1/backup.json", "c/cluster.json", "other/cluster.json", "c/walrus"]
    for n, key in enumerate(keys):
        storage.put(key, io.BytesIO(b"x" * (n + 1)))
    # Debris of killed writers, and a stray sidecar: never objects.
    (storage.root / "c/wal/0000000100000000/.tmp.000000010000000000000003.zst.123.abcd").write_bytes(b"partial")
    (storage.root / "c/wal/.tmp.00000003.history.meta.123.abcd").write_bytes(b"{}")
    (storage.root / "c/backups/b1/orphan.meta").write_bytes(b"{}")

    listed = list(storage.list("c/"))
    assert [o.key for o in listed] == sorted(k for k in keys if k.startswith("c/"))
    sizes = {o.key: o.size for o in listed}
    assert sizes["c/cluster.json"] == keys.index("c/cluster.json") + 1

    assert [o.key for o in storage.list("c/wal/")] == sorted(k for k in keys if k.startswith("c/wal/"))
    # A prefix is a string prefix, not a directory.
    assert [o.key for o in storage.list("c/wal")] == sorted(k for k in keys if k.startswith("c/wal"))
    assert [o.key for o in storage.list("c/backups/b1/")] == ["c/backups/b1/backup.json",
                                                              "c/backups/b1/part-00000.tar.zst"]
    assert list(storage.list("c/nope/")) == []


def test_delete_removes_object_sidecar_and_emptied_directories(storage: FileStorage) -> None:
    storage.put("c/backups/b1/part-00000.tar.zst", io.BytesIO(b"p0"))
    storage.put("c/backups/b1/backup.json", io.BytesIO(b"{}"))
    storage.put("c/cluster.json", io.BytesIO(b"{}"))

    storage.delete(["c/backups/b1/part-00000.tar.zst"])
    assert storage.head("c/backups/b1/part-00000.tar.zst") is None
    assert _all_files(storage.root) == ["c/backups/b1/backup.json", "c/backups/b1/backup.json.meta",
                                        "c/cluster.json", "c/cluster.json.meta"]

    storage.delete(["c/backups/b1/backup.json", "c/backups/b1/never-existed"])
    assert not (storage.root / "c/backups").exists()  # emptied directories go
    assert _all_files(storage.root) == ["c/cluster.json", "c/cluster.json.meta"]

    storage.delete(["c/cluster.json"])
    assert storage.root.is_dir()  # never the root itself
    assert list(storage.root.iterdir()) == []


def test_failed_put_leaves_no_temp_files_and_no_object(storage: FileStorage) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            return b"x" * 1024

    with pytest.raises(RepositoryError):
        storage.put("c/obj", Broken())  # type: ignore[arg-type]
    assert storage.head("c/obj") is None
    assert _temp_files(storage.root) == []
    assert list(storage.list("c/")) == []


def test_successful_and_losing_puts_leave_no_temp_files(storage: FileStorage) -> None:
    storage.put("c/a", io.BytesIO(b"1"))
    with pytest.raises(ObjectExists):
        storage.put("c/a", io.BytesIO(b"2"))
    storage.put("c/a", io.BytesIO(b"3"), overwrite=True)
    assert _all_files(storage.root) == ["c/a", "c/a.meta"]


def test_sweep_removes_only_temp_files(storage: FileStorage) -> None:
    storage.put("c/backups/b1/part-00000.tar.zst", io.BytesIO(b"p0"))
    tmp = storage.root / "c/backups/b1/.tmp.part-00001.tar.zst.99.beef"
    tmp.write_bytes(b"half a part")
    assert storage.sweep("c/backups/") == 1
    assert not tmp.exists()
    assert storage.sweep("c/backups/") == 0
    # A backup killed before its first part was published leaves a directory with a temp file only.
    (storage.root / "c/backups/b2").mkdir()
    (storage.root / "c/backups/b2/.tmp.part-00000.tar.zst.7.cafe").write_bytes(b"x")
    assert storage.sweep("c/backups/") == 1
    assert not (storage.root / "c/backups/b2").exists() and (storage.root / "c/backups/b1").is_dir()
    assert _read(storage, "c/backups/b1/part-00000.tar.zst") == b"p0"


def test_concurrent_overwrites_never_pair_one_writers_data_with_anothers_sidecar(storage: FileStorage) -> None:
    # A .partial replaced by two pushers at once: whoever wins, data and .meta must agree.
    key = "c/wal/0000000100000000/000000010000000000000001.partial.zst"
    for round_ in range(60):
        barrier = threading.Barrier(4)

        def writer(n: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
            payload = f"round {round_} writer {n} ".encode() * (1000 + n)
            barrier.wait()
            storage.put(key, io.BytesIO(payload), overwrite=True)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handle, meta = storage.open(key)
        with handle:
            data = handle.read()
        assert hashlib.sha256(data).hexdigest() == meta.sha256
        assert len(data) == meta.size
