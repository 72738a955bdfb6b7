"""psycopg helpers: connecting with the policy's conninfo and reading server facts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

from pgvault.errors import PostgresError
from pgvault.redaction import redact


@contextmanager
def connect(conninfo: str, *, timeout: int = 10) -> Iterator[psycopg.Connection]:
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=timeout,
                               application_name="pgvault")
    except psycopg.Error as exc:
        detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise PostgresError(f"cannot connect to PostgreSQL: {detail}",
                            hint="check postgres.conninfo in the policy (and PG* environment variables)") from None
    try:
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True)
class ServerFacts:
    system_id: str
    version_num: int
    wal_segment_size: int
    wal_level: str
    archive_mode: str
    archive_command: str
    in_recovery: bool
    data_directory: str


def server_facts(conn: psycopg.Connection) -> ServerFacts:
    try:
        cur = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
            " current_setting('server_version_num')::int,"
            " (SELECT setting::bigint * (CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 WHEN 'MB' THEN 1048576"
            "   ELSE 1 END) FROM pg_settings WHERE name = 'wal_segment_size'),"
            " current_setting('wal_level'), current_setting('archive_mode'),"
            " current_setting('archive_command'), pg_is_in_recovery(), current_setting('data_directory')"
        )
        row = cur.fetchone()
    except psycopg.Error as exc:
        raise PostgresError(f"cannot read server settings: {str(exc).strip()}",
                            hint="the role in postgres.conninfo needs superuser or pg_read_all_settings "
                            "and REPLICATION") from None
    assert row is not None
    return ServerFacts(str(row[0]), int(row[1]), int(row[2]), str(row[3]), str(row[4]), str(row[5]),
                       bool(row[6]), str(row[7]))
