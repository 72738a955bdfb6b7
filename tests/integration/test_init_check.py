"""init binds a repository to one database system; check proves archiving end to end."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Cluster, new_cluster, run_pgvault, write_policy


def test_init_is_idempotent(cluster: Cluster) -> None:
    state = cluster.repo.state("test/cluster.json")
    first = json.loads(cluster.repo.read("test/cluster.json"))
    again = cluster.ok("init")
    assert "already initialized" in again.stdout
    assert cluster.repo.state("test/cluster.json") == state, "init rewrote cluster.json"
    assert first["system_id"] == cluster.sql("SELECT system_identifier FROM pg_control_system()")


def test_init_refuses_a_repository_of_another_system(cluster: Cluster, workdir: Path) -> None:
    other = new_cluster(workdir, name="other", repo=cluster.repo, init=False)
    try:
        before = cluster.repo.state("test/cluster.json")
        result = other.pgvault("init")
        assert result.returncode == 1
        assert "belongs to database system" in result.stderr
        assert cluster.repo.state("test/cluster.json") == before
    finally:
        other.pg.stop(mode="immediate")


def test_check_proves_archiving_with_a_wal_switch(cluster: Cluster) -> None:
    result = cluster.ok("check", "--json")
    report = json.loads(result.stdout)
    archived = dict((c["check"], c["result"]) for c in report["checks"])["WAL archived"]
    assert cluster.repo.exists(f"test/wal/{archived[:16]}/{archived}.zst")


def test_check_says_archiving_is_broken_when_segments_do_not_arrive(cluster: Cluster, workdir: Path) -> None:
    cluster.sql("ALTER SYSTEM SET archive_command = 'false'")
    cluster.sql("SELECT pg_reload_conf()")
    config = workdir / "short.yaml"
    write_policy(config, "test", cluster.pg.conninfo(), cluster.repo, archive={"check_timeout": "3s"})
    cluster.sql("INSERT INTO t VALUES (1, 1)")
    result = run_pgvault("check", config=config)
    assert result.returncode == 1
    assert "archiving is broken" in result.stderr
    assert "pg_stat_archiver" in result.stderr
    assert "Traceback" not in result.out


def test_libpq_environment_variables_fill_in_the_conninfo(cluster: Cluster, workdir: Path) -> None:
    # conninfo names only the database; host, port and user come from PG* variables, as libpq does.
    config = workdir / "env.yaml"
    write_policy(config, "test", "dbname=postgres", cluster.repo)
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(cluster.pg.port), "PGUSER": "postgres"}
    result = run_pgvault("check", config=config, env=env)
    assert result.returncode == 0, result.out
    backup_id = run_pgvault("-q", "backup", config=config, env=env).stdout.strip()
    listed = json.loads(cluster.ok("list", "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == [backup_id]
