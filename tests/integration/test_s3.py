"""What only object storage has: listings in pages, conditional writes, flaky and dead endpoints.

S3 here is a real `moto_server` on loopback; faults come from tests/faultproxy.py between pgvault
and moto (moto has no fault injection of its own).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Cluster, Mark, make_workdir, new_cluster, rows_of
from repos import S3Repo

from pgvault.archive import push
from pgvault.catalog import Catalog
from pgvault.config import load_policy
from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import chown_to_db_user
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
        for instance in [*cluster.restored, cluster.pg]:
            with contextlib.suppress(Exception):
                instance.stop(mode="immediate")
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


def test_wal_objects_are_found_by_name_across_listing_pages(many_wal: tuple[Cluster, dict[str, object]],
                                                           tmp_path: Path) -> None:
    cluster, _h = many_wal
    names = [key.rsplit("/", 1)[-1].removesuffix(".zst") for key in cluster.repo.keys("test/wal/")]
    # The 1,050th segment (second listing page) comes back byte-exact through wal-fetch.
    name = [n for n in names if len(n) == 24][1050]
    dest = cluster.db_user_dir("fetched") / name
    cluster.ok("wal-fetch", name, str(dest))
    assert dest.stat().st_size == 1024 * 1024
