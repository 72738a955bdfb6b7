"""`pgvault verify` against a real repository on both backends: it finds every injected fault.

One cluster per backend (module-scoped), with a tablespace, two backups and WAL around them:

    batches | backup A | batch, WAL switch, batch, WAL switch | backup B | batch, WAL switch (flush)

Every test leaves the repository as it found it: each fault is undone (and the undoing checked)
before the next is injected. Faults go in through tests/repos.py's RepoHandle, behind pgvault's
back; the few rewrites that must keep metadata consistent (the --deep case) go through pgvault's
own Storage, so object and metadata (sidecar on a directory, object metadata on S3) agree.

Runs most checks through the CLI as the database user; the long fault loop calls run_verify (the
function the scheduler calls) in-process, to keep the file under a few minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zstandard
from conftest import Cluster, Result, make_workdir, new_cluster
from repos import FileRepo, flip_byte

from pgvault.config import Policy, load_policy
from pgvault.pg.instance import chown_to_db_user
from pgvault.pg.wal import WalSegment, is_backup_history, is_segment
from pgvault.repo import open_storage
from pgvault.repo.base import ObjectMeta, Storage
from pgvault.repo.layout import Layout
from pgvault.verify import VerifyReport, latest_verify_report, run_verify

pytestmark = [pytest.mark.integration]

LAYOUT = Layout("test")  # new_cluster's cluster name


@dataclass
class Env:
    cluster: Cluster
    policy: Policy
    storage: Storage
    a: dict[str, Any]  # backup A's sentinel, as `backup --json` printed it
    b: dict[str, Any]

    @property
    def repo(self) -> Any:
        return self.cluster.repo

    def verify(self, *args: str) -> Result:
        return self.cluster.pgvault("-q", "verify", *args)

    def verify_json(self, *args: str, expect_ok: bool = True) -> dict[str, Any]:
        result = self.verify("--json", *args)
        assert result.returncode == (0 if expect_ok else 1), result.out
        assert "Traceback" not in result.out
        return json.loads(result.stdout)

    def run(self, **kwargs: Any) -> VerifyReport:
        return run_verify(self.policy, self.storage, **kwargs)

    def wal_objects(self) -> list[str]:
        return [k for k in self.repo.keys(LAYOUT.wal_prefix) if not k.endswith(".history")]


def segment_key(name: str) -> str:
    return LAYOUT.wal_key(name)


@pytest.fixture(scope="module")
def env(backend: str) -> Iterator[Env]:
    workdir = make_workdir()
    cluster = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"})
    try:
        cluster.create_table()
        # A tablespace: its parts' files are named through pg_tblspc/<oid>/ in PostgreSQL's manifest.
        location = cluster.db_user_dir("ts-verify")
        cluster.sql(f"CREATE TABLESPACE ts_verify LOCATION '{location}'")
        cluster.sql("CREATE TABLE t_ts (batch int NOT NULL, n int NOT NULL) TABLESPACE ts_verify")
        cluster.commit_batches(2, pause=0.1, table="t_ts")
        cluster.commit_batches(2, pause=0.1)
        a = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        for _ in range(2):
            cluster.commit_batch()
            cluster.sql("SELECT pg_switch_wal()")
        b = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        assert any(part["tablespace"] for part in b["parts"]) and any(not part["tablespace"] for part in b["parts"])
        cluster.commit_batch()
        cluster.flush_archive()
        policy = load_policy(cluster.config)
        made = Env(cluster, policy, open_storage(policy.repository), a, b)
        # The first verify runs as the database user, so the report area it creates stays theirs.
        made.verify_json()
        yield made
    finally:
        with contextlib.suppress(Exception):
            cluster.pg.stop(mode="immediate")
        for instance in cluster.restored:
            with contextlib.suppress(Exception):
                instance.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


# ---- undoing damage -------------------------------------------------------------------------------

@dataclass
class Saved:
    key: str
    data: bytes
    meta: ObjectMeta


def save(env: Env, key: str) -> Saved:
    handle, meta = env.storage.open(key)
    with handle:
        return Saved(key, handle.read(), meta)


def put_back(env: Env, saved: Saved) -> None:
    """Restore an object exactly: its bytes and its recorded metadata."""
    env.storage.put(saved.key, io.BytesIO(saved.data), extra=dict(saved.meta.extra), overwrite=True)
    if isinstance(env.repo, FileRepo):
        for path in (env.repo.path / saved.key, env.repo.path / (saved.key + ".meta")):
            chown_to_db_user(path)
    assert env.repo.read(saved.key) == saved.data
    assert env.storage.head(saved.key) == saved.meta


def rewrite(env: Env, key: str, data: bytes) -> ObjectMeta:
    """Replace an object with consistent metadata, as pgvault itself would write it."""
    meta = env.storage.put(key, io.BytesIO(data), overwrite=True)
    if isinstance(env.repo, FileRepo):
        for path in (env.repo.path / key, env.repo.path / (key + ".meta")):
            chown_to_db_user(path)
    return meta


@contextlib.contextmanager
def damaged(env: Env, *keys: str) -> Iterator[list[Saved]]:
    saved = [save(env, key) for key in keys]
    try:
        yield saved
    finally:
        for item in saved:
            put_back(env, item)


# ---- a clean repository -----------------------------------------------------------------------------

def test_a_clean_repository_verifies_clean_and_stores_its_report(env: Env) -> None:
    report = env.verify_json()
    assert report["ok"] is True and report["problems"] == [] and report["deep"] is False
    checked = report["checked"]
    assert checked["backups"] == 2
    assert checked["parts"] == len(env.a["parts"]) + len(env.b["parts"])
    assert checked["manifests"] == 2 and checked["sentinels"] == 2 and checked["cluster"] == 1
    stored_objects = [k for k in env.repo.keys("test/") if k.split("/")[1] in ("backups", "wal", "cluster.json")]
    assert checked["objects"] == len(stored_objects)
    assert checked["wal_segments"] == len([k for k in env.wal_objects() if is_segment(Layout.wal_name(k))])
    assert checked["bytes"] >= env.a["stored_size"] + env.b["stored_size"]
    assert report["gaps"] == []
    [window] = report["windows"]
    assert window["timeline"] == 1 and window["backups"] == [env.a["id"], env.b["id"]]
    assert window["earliest_lsn"] == env.a["stop_lsn"]
    assert window["wal_end"] == Layout.wal_name(max(k for k in env.wal_objects() if is_segment(Layout.wal_name(k))))
    assert [b["ok"] for b in report["backups"]] == [True, True]

    # Stored where the metrics exporter finds it: the newest report is this one.
    assert report["report_key"] == LAYOUT.verify_report_key(report["id"])
    stored = latest_verify_report(env.storage, "test")
    assert stored is not None and stored["id"] == report["id"]
    assert {"id", "started", "finished", "ok", "problems", "checked", "deep"} <= set(stored)

    text = env.verify()
    assert text.returncode == 0, text.out
    assert "OK: every check passed" in text.stdout and f"backup {env.a['id']}: ok" in text.stdout


def test_deep_verify_checks_every_file_against_postgresqls_manifest(env: Env) -> None:
    report = env.verify_json("--deep")
    assert report["ok"] is True and report["deep"] is True, report["problems"]
    manifests = []
    for record in (env.a, env.b):
        raw = zstandard.ZstdDecompressor().decompress(env.repo.read(record["manifest"]["key"]))
        manifests.append(json.loads(raw)["Files"])
    assert report["checked"]["files"] == sum(len(files) for files in manifests)
    assert report["checked"]["file_bytes"] == sum(f["Size"] for files in manifests for f in files)


# ---- every injected fault is found ------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    kind: str  # flip, truncate, delete
    key: str
    at: int = 0  # byte offset (flip) or new length (truncate)

    def apply(self, env: Env) -> None:
        if self.kind == "flip":
            flip_byte(env.repo, self.key, self.at)
        elif self.kind == "truncate":
            env.repo.write_raw(self.key, env.repo.read(self.key)[: self.at])
        else:
            env.repo.remove(self.key)


def plan_faults(env: Env, rng: random.Random) -> list[Fault]:
    parts = [p["key"] for record in (env.a, env.b) for p in record["parts"]]
    manifests = [env.a["manifest"]["key"], env.b["manifest"]["key"]]
    sentinels = [LAYOUT.sentinel_key(env.a["id"]), LAYOUT.sentinel_key(env.b["id"])]
    wal = env.wal_objects()
    segments = sorted(k for k in wal if is_segment(Layout.wal_name(k)))
    # Deleting WAL is damage only where a backup needs it: from the oldest backup's start on. The newest
    # segment is excluded: from the repository alone its loss looks like "not archived yet" (it shows as
    # a gap once the next segment arrives); so is a .backup file, which recovery never reads.
    needed = [k for k in segments if env.a["start_wal"] <= Layout.wal_name(k) < Layout.wal_name(segments[-1])]
    assert len(needed) >= 3 and any(is_backup_history(Layout.wal_name(k)) for k in wal)
    plan = [("flip", parts, 4), ("truncate", parts, 3), ("delete", parts, 3),
            ("flip", manifests, 2), ("truncate", manifests, 2), ("delete", manifests, 2),
            ("flip", sentinels, 2), ("truncate", sentinels, 2), ("delete", sentinels, 2),
            ("flip", [LAYOUT.cluster_json], 1), ("truncate", [LAYOUT.cluster_json], 1),
            ("delete", [LAYOUT.cluster_json], 1),
            ("flip", wal, 4), ("truncate", wal, 3), ("delete", needed, 3)]
    faults = []
    for kind, keys, count in plan:
        for key in rng.sample(keys, min(count, len(keys))):
            size = len(env.repo.read(key))
            at = rng.randrange(size) if kind == "flip" else rng.randrange(size) if kind == "truncate" else 0
            faults.append(Fault(kind, key, at))
    return faults


def test_every_injected_fault_is_detected(env: Env) -> None:
    seed = int(os.environ.get("PGVAULT_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    faults = plan_faults(env, rng)
    assert len(faults) >= 30 and {f.kind for f in faults} == {"flip", "truncate", "delete"}
    sentinels = {LAYOUT.sentinel_key(env.a["id"]), LAYOUT.sentinel_key(env.b["id"])}
    manifests = {env.a["manifest"]["key"], env.b["manifest"]["key"]}
    missed = []
    for n, fault in enumerate(faults):
        with damaged(env, fault.key):
            fault.apply(env)
            report = env.run(deep=n % 4 == 0)  # every fourth through the --deep path too
        keys = {p.key for p in report.problems}
        # Found, and named: the damaged object itself. Besides it only consequences may appear: a
        # backup that can no longer become consistent, or a manifest whose files sat in a damaged part.
        if report.ok or fault.key not in keys or not keys <= {fault.key} | sentinels | manifests:
            missed.append((fault, [str(p) for p in report.problems]))
    assert not missed, f"seed {seed}: {len(missed)} of {len(faults)} faults not detected or misreported: {missed}"
    clean = env.run(deep=True)
    assert clean.ok, f"seed {seed}: the repository did not verify clean after the faults: {clean.problems}"


@pytest.mark.file_only  # every object has a sidecar only on a directory; on S3 see the fault loop
def test_file_backend_rehashes_the_data_not_the_sidecar(env: Env) -> None:
    """A truncated or flipped data file beside an untouched .meta sidecar is still caught."""
    assert isinstance(env.repo, FileRepo)
    part = env.b["parts"][1]["key"]
    segment = segment_key(env.b["start_wal"])
    # Damage to the segment B starts in also leaves B unable to become consistent.
    consequences = {part: [], segment: [(LAYOUT.sentinel_key(env.b["id"]), "unusable")]}
    for key in (part, segment):
        sidecar = (env.repo.path / (key + ".meta")).read_bytes()
        with damaged(env, key):
            env.repo.write_raw(key, env.repo.read(key)[:-1])
            truncated = env.verify_json(expect_ok=False)
            assert (env.repo.path / (key + ".meta")).read_bytes() == sidecar
        with damaged(env, key):
            flip_byte(env.repo, key, 0)
            flipped = env.verify_json(expect_ok=False)
            assert (env.repo.path / (key + ".meta")).read_bytes() == sidecar
        assert [(p["object"], p["kind"]) for p in truncated["problems"]] == [*consequences[key], (key, "size")]
        assert [(p["object"], p["kind"]) for p in flipped["problems"]] == [*consequences[key], (key, "checksum")]


# ---- what the CLI says ------------------------------------------------------------------------------

def test_a_damaged_object_fails_verify_with_exit_1_naming_it(env: Env) -> None:
    part = env.a["parts"][2]["key"]
    with damaged(env, part):
        flip_byte(env.repo, part)
        text = env.verify()
        as_json = env.verify("--json")
    assert text.returncode == 1 and as_json.returncode == 1
    assert "Traceback" not in text.out + as_json.out
    errors = [line for line in text.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: verify found 1 problem(s); the first: {part}: SHA-256 "
                      + errors[0].split("SHA-256 ", 1)[1]]
    assert f"problem (checksum): {part}: " in text.stdout and "FAILED: 1 problem(s)" in text.stdout
    assert f"backup {env.a['id']}: 1 problem(s)" in text.stdout
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and [p["object"] for p in report["problems"]] == [part]
    assert "hint: the report is stored as" in text.stderr
    # The failed run is the newest report: what the metrics exporter shows as "last verify result".
    latest = latest_verify_report(env.storage, "test")
    assert latest is not None and latest["id"] == report["id"] and latest["ok"] is False


def test_a_wal_gap_is_reported_with_the_windows_that_remain(env: Env) -> None:
    # A segment between the two backups: A can still be restored up to it, B from its own start on.
    start_b = WalSegment.parse(env.b["start_wal"])
    missing = WalSegment(1, start_b.number - 1)
    assert missing.name > env.a["stop_wal"]
    newest = max(Layout.wal_name(k) for k in env.wal_objects() if is_segment(Layout.wal_name(k)))
    with damaged(env, segment_key(missing.name)):
        env.repo.remove(segment_key(missing.name))
        report = env.verify_json(expect_ok=False)
        text = env.verify()
    assert report["gaps"] == [{"first": missing.name, "last": missing.name, "segments": 1, "timelines": [1],
                               "from_lsn": str(missing.start_lsn), "to_lsn": str(missing.end_lsn)}]
    assert [(p["object"], p["kind"]) for p in report["problems"]] == [(segment_key(missing.name), "gap")]
    assert [(w["timeline"], w["backups"], w["earliest_lsn"], w["wal_end"]) for w in report["windows"]] == [
        (1, [env.a["id"]], env.a["stop_lsn"], WalSegment(1, missing.number - 1).name),
        (1, [env.b["id"]], env.b["stop_lsn"], newest),
    ]
    assert f"WAL gap: {missing.name} (1 segment(s)), timeline(s) 1" in text.stdout
    assert text.returncode == 1


def repack_part(data: bytes, change: Callable[[tarfile.TarInfo, bytes], bytes | None]) -> tuple[bytes, str]:
    """The part with its first regular file of some size changed (or dropped), recompressed."""
    out = io.BytesIO()
    victim = ""
    raw = io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    with tarfile.open(fileobj=raw, mode="r:") as source, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as target:
        for member in source:
            body = source.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            if not victim and member.isreg() and member.size > 64 and member.name not in ("backup_label",):
                victim = member.name
                body = change(member, body or b"")
                if body is None:
                    continue
            target.addfile(member, io.BytesIO(body) if body is not None else None)
    assert victim
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(out.getvalue()), victim


def flip_inside(_member: tarfile.TarInfo, body: bytes) -> bytes:
    changed = bytearray(body)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def drop(_member: tarfile.TarInfo, _body: bytes) -> None:
    return None


@pytest.mark.parametrize(("change", "in_tablespace", "expected"), [
    (flip_inside, False, "checksum mismatch with the manifest"),
    (flip_inside, True, "checksum mismatch with the manifest"),
    (drop, False, "is listed in the manifest but is in no part of the backup"),
], ids=["file-changed", "tablespace-file-changed", "file-dropped"])
def test_deep_catches_damage_that_keeps_every_checksum_valid(env: Env, change: Callable[..., Any],
                                                             in_tablespace: bool, expected: str) -> None:
    """A part rebuilt with one file changed, stored with fresh metadata, and the sentinel updated to
    match: every object checksum is valid, so only the comparison with PostgreSQL's manifest can tell."""
    sentinel_key = LAYOUT.sentinel_key(env.b["id"])
    index = [i for i, p in enumerate(env.b["parts"]) if bool(p["tablespace"]) == in_tablespace][-1]
    part_key = env.b["parts"][index]["key"]
    prefix = f"pg_tblspc/{env.b['parts'][index]['tablespace']}/" if in_tablespace else ""
    with damaged(env, part_key, sentinel_key):
        data, victim = repack_part(env.repo.read(part_key), change)
        meta = rewrite(env, part_key, data)
        record = json.loads(env.repo.read(sentinel_key))
        record["parts"][index].update(size=meta.size, sha256=meta.sha256)
        rewrite(env, sentinel_key, json.dumps(record, indent=2).encode())

        plain = env.verify_json()  # every object is as its records say
        deep = env.verify_json("--deep", expect_ok=False)
        text = env.verify("--deep", env.b["id"])
    assert plain["ok"] is True
    [problem] = deep["problems"]
    if change is drop:
        assert problem["object"] == env.b["manifest"]["key"]
    else:
        assert problem["object"] == part_key
    assert problem["kind"] == "manifest" and re.search(rf"file {re.escape(prefix + victim)}[: ]", problem["message"])
    assert expected in problem["message"]
    assert text.returncode == 1 and victim in text.stdout


# ---- one backup -------------------------------------------------------------------------------------

def test_verify_with_an_id_checks_that_backup_and_the_wal_it_needs(env: Env) -> None:
    part_of_a = env.a["parts"][0]["key"]
    only_a_needs = segment_key(env.a["start_wal"])  # before B's start
    assert env.a["start_wal"] < env.b["start_wal"]
    with damaged(env, part_of_a, only_a_needs):
        flip_byte(env.repo, part_of_a)
        flip_byte(env.repo, only_a_needs)
        report_b = env.verify_json(env.b["id"])
        report_a = env.verify_json(env.a["id"], expect_ok=False)
    assert report_b["backup_id"] == env.b["id"] and [b["id"] for b in report_b["backups"]] == [env.b["id"]]
    assert report_b["checked"]["parts"] == len(env.b["parts"])
    assert {p["object"] for p in report_a["problems"]} == {part_of_a, only_a_needs,
                                                          LAYOUT.sentinel_key(env.a["id"])}
    unusable = [p for p in report_a["problems"] if p["kind"] == "unusable"]
    assert unusable and env.a["start_wal"] in unusable[0]["message"]

    unknown = env.verify("20000101T000000Z")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: no backup '20000101T000000Z' in this repository")


# ---- timelines --------------------------------------------------------------------------------------

def test_a_new_timeline_is_followed_through_its_history_file(env: Env) -> None:
    """A restored copy that keeps archiving into the repository starts timeline 2 there (this test runs
    last: the repository keeps that timeline)."""
    mapped = env.cluster.workdir / "ts-timeline-2"
    _result, copy = env.cluster.restore_json("--tablespace-map", f"ts_verify={mapped}", archive_mode="preserve")
    try:
        name = str(copy.query("SELECT pg_walfile_name(pg_switch_wal())")[0][0])
        deadline = time.monotonic() + 60
        while not (env.repo.exists(segment_key(name)) and env.repo.exists(LAYOUT.wal_key("00000002.history"))):
            assert time.monotonic() < deadline, f"timeline 2's {name} was not archived"
            time.sleep(0.2)
    finally:
        copy.stop(mode="fast")
    assert name.startswith("00000002")
    report = env.verify_json()
    assert report["checked"]["wal_history"] == 1
    windows = {w["timeline"]: w for w in report["windows"]}
    assert set(windows) == {1, 2}
    assert windows[2]["backups"] == [env.a["id"], env.b["id"]] and windows[2]["wal_end"] == name

    history = LAYOUT.wal_key("00000002.history")
    with damaged(env, history):
        env.repo.remove(history)
        lost = env.verify_json(expect_ok=False)
    assert [(p["object"], p["kind"]) for p in lost["problems"]] == [(history, "timeline")]

    # A gap before the switch is a gap on both timelines: reported once, naming both.
    between = WalSegment(1, WalSegment.parse(env.b["start_wal"]).number - 1).name
    with damaged(env, segment_key(between)):
        env.repo.remove(segment_key(between))
        gapped = env.verify_json(expect_ok=False)
    assert [(g["first"], g["timelines"]) for g in gapped["gaps"]] == [(between, [1, 2])]
    assert env.verify_json()["ok"] is True
