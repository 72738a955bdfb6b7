"""Real PostgreSQL servers started through pgvault.pg.instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgvault.errors import PostgresError
from pgvault.pg.instance import LocalInstance, as_db_user, free_port

# No skip when PostgreSQL is missing: scripts/setup installs it, and a suite that silently skips
# its real-server tests proves nothing.
pytestmark = [pytest.mark.integration]


def test_create_start_query_stop_destroy(workdir: Path) -> None:
    port = free_port()
    instance = LocalInstance.create(
        workdir / "data", port=port, settings={"cluster_name": "it's a \\ test", "wal_level": "replica"}
    )
    with instance:
        assert (instance.pgdata / "PG_VERSION").is_file()
        assert not instance.is_running()

        instance.start()
        assert instance.is_running()
        assert instance.psql("SHOW port") == str(port)
        assert instance.psql("SHOW data_checksums") == "on"
        assert instance.psql("SHOW listen_addresses") == "127.0.0.1"
        assert instance.psql("SHOW unix_socket_directories") == ""
        assert instance.psql("SHOW wal_level") == "replica"
        # Quotes and backslashes survive the trip through postgresql.auto.conf.
        assert instance.psql("SHOW cluster_name") == "it's a \\ test"
        assert instance.psql("SELECT current_user") == "postgres"

        # psql -At formatting: '|' between columns, rows on lines, NULL empty, booleans t/f,
        # and only the last statement's result.
        assert instance.psql("SELECT 0; SELECT 1, NULL::text, true UNION ALL SELECT 2, 'x', false") == (
            "1||t\n2|x|f"
        )
        assert instance.psql("CREATE TABLE t (id int, name text)") == ""
        assert instance.query("INSERT INTO t VALUES (%s, %s), (%s, %s)", (1, "a", 2, None)) == []
        assert instance.query("SELECT id, name FROM t ORDER BY id") == [(1, "a"), (2, None)]
        assert instance.query("SELECT pg_is_in_recovery()") == [(False,)]
        instance.wait_ready(timeout=10)
        instance.wait_promoted(timeout=10)

        with pytest.raises(PostgresError, match="division by zero"):
            instance.psql("SELECT 1/0")

        instance.stop()
        assert not instance.is_running()
        instance.stop()  # stopping a stopped server is not an error
        assert instance.log_path.is_file()
        assert "database system is shut down" in instance.log_path.read_text()

    assert not instance.pgdata.exists()
    assert not instance.log_path.exists()


def test_existing_replaces_port_and_keeps_data(workdir: Path) -> None:
    pgdata = workdir / "data"
    first = LocalInstance.create(pgdata, settings={"work_mem": "7MB"})
    first.start()
    first.psql("CREATE TABLE kept AS SELECT 42 AS answer")
    first.stop()

    new_port = free_port()
    again = LocalInstance.existing(pgdata, port=new_port)
    try:
        auto_conf = (pgdata / "postgresql.auto.conf").read_text()
        port_lines = [line for line in auto_conf.splitlines() if line.startswith("port")]
        assert port_lines == [f"port = '{new_port}'"]
        assert "work_mem = '7MB'" in auto_conf  # the rest of the file is kept
        assert (pgdata.stat().st_mode & 0o777) == 0o700
        if os.geteuid() == 0:
            assert pgdata.stat().st_uid != 0

        again.start()
        assert again.psql("SHOW port") == str(new_port)
        assert again.psql("SHOW work_mem") == "7MB"
        assert again.query("SELECT answer FROM kept") == [(42,)]
    finally:
        again.destroy()
    assert not pgdata.exists()


def test_start_failure_reports_server_log(workdir: Path) -> None:
    with LocalInstance.create(workdir / "data", settings={"shared_buffers": "not-a-size"}) as instance:
        with pytest.raises(PostgresError) as excinfo:
            instance.start(timeout=30)
        message = str(excinfo.value)
        assert "shared_buffers" in message  # the server log's complaint is in the error
        assert not instance.is_running()


def test_start_nowait_then_wait_ready(workdir: Path) -> None:
    with LocalInstance.create(workdir / "data") as instance:
        instance.start(wait=False)
        instance.wait_ready(timeout=60)
        assert instance.psql("SELECT 1") == "1"
        instance.stop("immediate")
        instance.wait_stopped(timeout=30)
        assert not instance.is_running()


def test_as_db_user_prefix() -> None:
    cmd = ["pg_ctl", "status"]
    if os.geteuid() == 0:
        assert as_db_user(cmd)[-3:] == ["--", "pg_ctl", "status"]
        assert "postgres" in as_db_user(cmd)
    else:
        assert as_db_user(cmd) == cmd
