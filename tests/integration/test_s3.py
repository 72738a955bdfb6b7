"""What only object storage has: listings in pages, conditional writes, flaky and dead endpoints.

S3 here is a real `moto_server` on loopback; faults come from tests/faultproxy.py between pgvault
and moto (moto has no fault injection of its own).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import PGVAULT, Cluster, Mark, make_workdir, moto, new_cluster, rows_of, run_pgvault
from faultproxy import FaultProxy
from repos import S3Repo, flip_byte

from pgvault.archive import push
from pgvault.catalog import Catalog
from pgvault.config import load_policy
from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import as_db_user, chown_to_db_user
from pgvault.repo import open_storage

pytestmark = [pytest.mark.integration]


def _stamp(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _wait_archived_all(cluster: Cluster, timeout: float = 120) -> None:
    """Until PostgreSQL has no segment left waiting for archive_command."""
    status = cluster.pg.pgdata / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while any(p.name.endswith(".ready") for p in status.iterdir()):
        assert time.monotonic() < deadline, "archiving did not catch up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def many_wal() -> Iterator[tuple[Cluster, dict[str, object]]]:
    """A repository holding 1,100+ WAL objects (1 MiB segments), two backups, rows in between."""
    workdir = make_workdir()
    spool = workdir / "spool"
    spool.mkdir()
    chown_to_db_user(spool)
    cluster = new_cluster(workdir, backend="s3", initdb_options=["--wal-segsize=1"], settings={"autovacuum": "off"})
    try:
        cluster.create_table()
        a = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        first = cluster.commit_batch()
        # Archive the bulk with cp and push it from here, in-process: 1,100 archive_command runs
        # of a fresh Python each would take minutes, and what is tested is the repository's size.
        pgvault_command = cluster.pg.psql("SHOW archive_command")
        set_auto_conf(cluster.pg.pgdata, {"archive_command": f"cp %p {spool}/%f"})
        cluster.pg.psql("SELECT pg_reload_conf()")
        cluster.pg.psql("CREATE TABLE filler (n int)")
        cluster.pg.psql("DO $$ BEGIN FOR i IN 1..1100 LOOP INSERT INTO filler VALUES (i); "
                        "PERFORM pg_switch_wal(); END LOOP; END $$")
        _wait_archived_all(cluster)
        set_auto_conf(cluster.pg.pgdata, {"archive_command": pgvault_command})
        cluster.pg.psql("SELECT pg_reload_conf()")
        policy = load_policy(cluster.config)
        storage = open_storage(policy.repository)
        catalog = Catalog(storage, policy.cluster)
        info = catalog.require_cluster_info()
        for path in sorted(spool.iterdir()):
            push(storage, catalog.layout, path, system_id=info.system_id, segment_size=info.wal_segment_size, level=1)
        second = cluster.commit_batch()
        b = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        third = cluster.commit_batch()
        cluster.commit_batch()  # a later commit, so a target after the third one is inside the window
        cluster.flush_archive()
        yield cluster, {"a": a, "b": b, "first": first, "second": second, "third": third}
    finally:
        cluster.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_repository_of_more_than_1000_wal_objects_lists_and_restores(
        many_wal: tuple[Cluster, dict[str, object]]) -> None:
    cluster, h = many_wal
    assert isinstance(cluster.repo, S3Repo)
    wal_keys = cluster.repo.keys("test/wal/")
    assert len(wal_keys) > 1100, len(wal_keys)

    # The window runs unbroken from the first backup over every page of the listing to the end.
    report = json.loads(cluster.ok("-q", "info", "--json").stdout)
    [window] = report["windows"]
    a, b = h["a"], h["b"]
    assert isinstance(a, dict) and isinstance(b, dict)
    assert window["backups"] == [a["id"], b["id"]]
    assert window["earliest_lsn"] == a["stop_lsn"]
    first, second, third = h["first"], h["second"], h["third"]
    assert isinstance(first, Mark) and isinstance(second, Mark) and isinstance(third, Mark)
    # The server stamps the commit just before the client sees COMMIT return.
    assert third.committed_at < _stamp(window["latest_time"])

    # Early target: the first backup, a few segments of replay from the first listing page.
    restored, instance = cluster.restore_json("--target-time", first.between_next.isoformat())
    assert restored["backup_id"] == a["id"]
    assert rows_of(instance) == sorted(first.rows)
    # Late target: past the 1,000th key, from the second backup.
    restored, instance = cluster.restore_json("--target-time", third.between_next.isoformat())
    assert restored["backup_id"] == b["id"]
    assert rows_of(instance) == sorted(first.rows + second.rows + third.rows)


def test_a_repository_of_more_than_1000_wal_objects_verifies(many_wal: tuple[Cluster, dict[str, object]]) -> None:
    cluster, h = many_wal
    report = json.loads(cluster.ok("-q", "verify", "--json").stdout)
    assert report["ok"] is True and report["problems"] == [] and report["gaps"] == [], report["problems"]
    assert report["checked"]["wal_segments"] > 1100
    [window] = report["windows"]
    a, b = h["a"], h["b"]
    assert isinstance(a, dict) and isinstance(b, dict)
    assert window["backups"] == [a["id"], b["id"]]
    # A segment past the first listing page, damaged, is found and named.
    victim = cluster.repo.keys("test/wal/")[1050]
    assert isinstance(cluster.repo, S3Repo)
    original = cluster.repo.read(victim)
    flip_byte(cluster.repo, victim)
    try:
        damaged = cluster.pgvault("-q", "verify")
        assert damaged.returncode == 1 and victim in damaged.stderr, damaged.out
    finally:
        cluster.repo.write_raw(victim, original)


def test_wal_objects_are_found_by_name_across_listing_pages(many_wal: tuple[Cluster, dict[str, object]],
                                                           tmp_path: Path) -> None:
    cluster, _h = many_wal
    names = [key.rsplit("/", 1)[-1].removesuffix(".zst") for key in cluster.repo.keys("test/wal/")]
    # The 1,050th segment (second listing page) comes back byte-exact through wal-fetch.
    name = [n for n in names if len(n) == 24][1050]
    dest = cluster.db_user_dir("fetched") / name
    cluster.ok("wal-fetch", name, str(dest))
    assert dest.stat().st_size == 1024 * 1024


# ---- a flaky endpoint and a dead one -------------------------------------------------------------------

def _wal_versions(repo: S3Repo) -> dict[str, int]:
    """How many versions each archived WAL object has in the (versioned) bucket."""
    counts: dict[str, int] = {}
    pages = repo.client.get_paginator("list_object_versions").paginate(Bucket=repo.bucket, Prefix="repo/test/wal/")
    for page in pages:
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(moto().port, seed=20261126) as running:
        yield running


def _flaky_cluster(workdir: Path, proxy: FaultProxy, part_size: str = "1MiB", **s3: object) -> Cluster:
    repo = S3Repo(moto(), endpoint=proxy.url, **{"connect_timeout": "1s", "read_timeout": "3s", **s3})
    return new_cluster(workdir, backend="s3", repo=repo, settings={"autovacuum": "off"},
                       archive={"check_timeout": "10m"}, backup={"part_size": part_size})


def test_backup_archiving_under_pgbench_and_pitr_succeed_with_a_fifth_of_requests_failing(
        workdir: Path, proxy: FaultProxy) -> None:
    # 500s and resets, bodies cut off mid-stream, and answers lost after the store acted; a few
    # SlowDowns (they back off from 1 s, so they are kept rare).
    proxy.set_faults(0.2, ("500", "reset", "truncate", "reset-after") * 3 + ("503",))
    cluster = _flaky_cluster(workdir, proxy, part_size="64MiB", retries=12, retry_window="60s")
    cluster.create_table()
    pg = cluster.pg
    bench = [str(pg.bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"]
    subprocess.run([*bench[:-1], "-i", "-s", "2", "-q", "postgres"], check=True, capture_output=True)
    # Poorly compressible rows, so parts outgrow one 5 MiB chunk and go up as multipart uploads.
    pg.psql("CREATE TABLE noise AS SELECT md5(random()::text) || md5(random()::text) AS v "
            "FROM generate_series(1, 400000)")
    backup = json.loads(cluster.ok("-q", "backup", "--json").stdout)
    part_keys = [p["key"] for p in json.loads(cluster.ok("-q", "info", backup["id"], "--json").stdout)["parts"]]
    assert any(cluster.repo.exists(key + ".meta") for key in part_keys), "no part was a multipart upload"
    load = subprocess.Popen([*bench[:-1], "-c", "2", "-T", "60", "postgres"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        marks = cluster.commit_batches(8, pause=6)
    finally:
        load.wait(120)
    assert load.returncode == 0
    cluster.commit_batch()
    cluster.flush_archive()
    faults = proxy.stats
    proxy.set_faults(0.0)
    assert faults["faults"] >= 0.1 * faults["requests"] and faults["reset-after"] > 0, faults

    report = json.loads(cluster.ok("-q", "info", "--json").stdout)
    [window] = report["windows"]
    assert window["backups"] == [backup["id"]]
    archived = pg.query("SELECT archived_count FROM pg_stat_archiver")[0][0]
    assert int(archived) >= 10
    # A retried PUT whose first answer was lost found its own object (412, same SHA-256): no
    # segment was ever written twice.
    versions = _wal_versions(cluster.repo)  # type: ignore[arg-type]
    assert versions and all(count == 1 for count in versions.values()), versions

    proxy.set_faults(0.2, ("500", "reset", "truncate", "reset-after"))
    restored, instance = cluster.restore_json("--target-time", marks[5].between_next.isoformat())
    assert restored["backup_id"] == backup["id"]
    assert rows_of(instance) == sorted(marks.rows_through(5))


@pytest.mark.parametrize("kind", ["reset", "stall", "503"])
def test_in_an_outage_wal_push_fails_in_time_postgres_keeps_the_wal_and_archiving_catches_up(
        workdir: Path, proxy: FaultProxy, kind: str) -> None:
    # The documented bound of one request: retry_window + connect_timeout + read_timeout.
    cluster = _flaky_cluster(workdir, proxy, retries=20, retry_window="4s")
    bound = 4 + 1 + 3
    cluster.create_table()
    backup = cluster.backup()
    before = cluster.commit_batch()
    cluster.flush_archive()

    proxy.outage(True, kind=kind)
    proxy.set_faults(0.0, stall_seconds=10)
    during = cluster.commit_batches(2, pause=0.3)
    segment = cluster.pg.psql("SELECT pg_walfile_name(pg_switch_wal())")
    ready = cluster.pg.pgdata / "pg_wal" / "archive_status" / f"{segment}.ready"
    started = time.monotonic()
    result = cluster.pgvault("wal-push", str(cluster.pg.pgdata / "pg_wal" / segment))
    elapsed = time.monotonic() - started
    assert 0 < result.returncode < 126 and "Traceback" not in result.out, result.out
    assert elapsed < bound + 3, f"wal-push took {elapsed:.1f} s in a {kind} outage"
    assert len(result.stderr.strip().splitlines()) <= 2 and result.stderr.startswith("error:"), result.stderr
    # PostgreSQL's own archive_command calls fail too: the segment stays, marked ready.
    deadline = time.monotonic() + 60
    while int(cluster.pg.query("SELECT failed_count FROM pg_stat_archiver")[0][0]) == 0:
        assert time.monotonic() < deadline, "archive_command never failed during the outage"
        time.sleep(0.5)
    assert (cluster.pg.pgdata / "pg_wal" / segment).exists() and ready.exists()

    proxy.outage(False)
    after = cluster.commit_batches(2, pause=0.3)
    cluster.flush_archive()
    [window] = json.loads(cluster.ok("-q", "info", "--json").stdout)["windows"]
    assert window["backups"] == [backup]
    assert _stamp(window["latest_time"]) > after[0].committed_at
    # No gap: a target after the outage replays straight through the WAL written during it.
    _restored, instance = cluster.restore_json("--target-time", after[0].between_next.isoformat())
    assert rows_of(instance) == sorted(before.rows + during.rows_through(1) + after.rows_through(0))


def test_two_nodes_pushing_one_segment_at_once_end_with_one_object(cluster_s3: Cluster) -> None:
    cluster = cluster_s3
    segment = cluster.pg.psql("SELECT pg_walfile_name(pg_switch_wal())")
    cluster.flush_archive()
    original = cluster.repo.read(f"test/wal/{segment[:16]}/{segment}.zst")
    cluster.repo.remove(f"test/wal/{segment[:16]}/{segment}.zst")
    source = cluster.pg.pgdata / "pg_wal" / segment
    copies = []
    for n in range(4):
        copy = cluster.db_user_dir(f"node{n}") / segment
        copy.write_bytes(source.read_bytes())
        chown_to_db_user(copy)
        copies.append(copy)
    same = [subprocess.Popen(as_db_user([PGVAULT, "--config", str(cluster.config), "wal-push", str(c)]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in copies]
    codes = [p.wait(60) for p in same]
    assert codes == [0, 0, 0, 0], [p.stderr.read() for p in same if p.stderr]  # type: ignore[union-attr]
    key = f"repo/test/wal/{segment[:16]}/{segment}.zst"
    versions = _wal_versions(cluster.repo)  # type: ignore[arg-type]
    assert versions[key] == 2, "four racing pushes of one segment wrote it more than once"  # + the removed one
    assert len(original) > 0

    # Different content at the same moment: exactly one wins, the others fail and change nothing.
    cluster.repo.remove(f"test/wal/{segment[:16]}/{segment}.zst")
    for n, copy in enumerate(copies):
        data = bytearray(source.read_bytes())
        data[-1 - n] ^= 0xFF
        copy.write_bytes(bytes(data))
    racing = [subprocess.Popen(as_db_user([PGVAULT, "--config", str(cluster.config), "wal-push", str(c)]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in copies]
    codes = [p.wait(60) for p in racing]
    assert sorted(codes)[0] == 0 and codes.count(0) == 1 and all(0 < c < 126 for c in codes if c), codes
    winner = copies[codes.index(0)]
    fetched = cluster.db_user_dir("fetched") / segment
    cluster.ok("wal-fetch", segment, str(fetched))
    assert fetched.read_bytes() == winner.read_bytes()
    assert _wal_versions(cluster.repo)[key] == 3  # type: ignore[arg-type]


@pytest.fixture
def cluster_s3(workdir: Path) -> Iterator[Cluster]:
    made = new_cluster(workdir, backend="s3")
    try:
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")


def test_endpoint_and_credentials_come_from_the_standard_aws_configuration(cluster_s3: Cluster) -> None:
    cluster = cluster_s3
    backup = cluster.backup()
    assert isinstance(cluster.repo, S3Repo)
    base = {"cluster": "test", "postgres": {"conninfo": cluster.pg.conninfo()}}

    # The endpoint from AWS_ENDPOINT_URL_S3, as the aws CLI takes it.
    bare = cluster.workdir / "bare.yaml"
    bare.write_text(yaml.safe_dump({**base, "repository": {"url": cluster.repo.url}}))
    chown_to_db_user(bare)
    result = run_pgvault("-q", "list", "--json", config=bare, env={"AWS_ENDPOINT_URL_S3": moto().url})
    assert result.returncode == 0, result.out
    assert [b["id"] for b in json.loads(result.stdout)["backups"]] == [backup]

    # A named profile of the shared files: credentials and endpoint, nothing in the environment.
    aws = cluster.db_user_dir("aws")
    (aws / "credentials").write_text("[pgv]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n")
    (aws / "config").write_text(f"[profile pgv]\nregion = us-east-1\nendpoint_url = {moto().url}\n")
    for name in ("credentials", "config"):
        chown_to_db_user(aws / name)
    profiled = cluster.workdir / "profiled.yaml"
    profiled.write_text(yaml.safe_dump({**base, "repository": {"url": cluster.repo.url, "s3": {"profile": "pgv"}}}))
    chown_to_db_user(profiled)
    env = {"AWS_CONFIG_FILE": str(aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    result = run_pgvault("-q", "list", "--json", config=profiled, env=env)
    assert result.returncode == 0, result.out
    assert [b["id"] for b in json.loads(result.stdout)["backups"]] == [backup]
    assert "profile-secret" not in result.out
