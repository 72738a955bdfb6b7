"""Point-in-time recovery against real PostgreSQL: restored rows must equal exactly what was committed."""

from __future__ import annotations

from conftest import Cluster, rows_of


def test_pitr_by_time_restores_exactly_the_committed_rows(cluster: Cluster) -> None:
    cluster.backup()
    marks = cluster.commit_batches(6)
    cluster.flush_archive()
    restored = cluster.restore_into("--target-time", marks[3].between_next.isoformat())
    assert rows_of(restored) == marks.rows_through(3)
