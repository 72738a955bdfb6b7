"""`pgvault patroni-bootstrap` and `pgvault patroni-replica` called as Patroni calls them, without Patroni.

Patroni runs the bootstrap command with --scope, --datadir and each extra key of the method as
--key=value, on a data directory that does not exist yet, and starts the result as a primary;
it runs the replica command with --scope, --role, --datadir, --connstring (and the method's own
no_leader/keep_data), and starts the result as a standby. tests/ha runs both inside real Patroni.
"""

from __future__ import annotations

import pytest
from conftest import Cluster, rows_of, wait_for

from pgvault.pg.autoconf import read_auto_conf, set_auto_conf
from pgvault.pg.instance import LocalInstance
from pgvault.pg.recovery import restore_command

pytestmark = [pytest.mark.integration, pytest.mark.file_only]

PRIVATE = {"listen_addresses", "unix_socket_directories", "hba_file", "archive_command", "restore_command",
           "recovery_target_time", "recovery_target_action", "primary_conninfo", "cluster_name"}


def test_bootstrap_leaves_a_promoted_primary_at_the_target_with_its_history_archived(cluster: Cluster) -> None:
    cluster.create_table()
    cluster.backup()
    marks = cluster.commit_batches(4)
    cluster.flush_archive()
    datadir = cluster.workdir / "bootstrapped"  # Patroni passes a directory that does not exist yet
    result = cluster.pgvault("patroni-bootstrap", "--scope=platform", f"--datadir={datadir}",
                             f"--target-time={marks[1].between_next.isoformat()}")
    assert result.returncode == 0, result.out
    assert "timeline 2" in result.stdout

    # What Patroni gets: no signal file, none of the private recovery's settings left over (they would
    # override Patroni's postgresql.conf), a clean shutdown, and the new timeline in the repository.
    assert not (datadir / "recovery.signal").exists() and not (datadir / "standby.signal").exists()
    assert not PRIVATE & set(read_auto_conf(datadir))
    assert "shut down" in LocalInstance.default_log_path(datadir).read_text().splitlines()[-1]
    assert cluster.pgvault("wal-fetch", "00000002.history", str(cluster.workdir / "h")).returncode == 0

    instance = LocalInstance.existing(datadir)  # as Patroni would start it: an ordinary primary
    cluster.restored.append(instance)
    instance.start()
    assert instance.query("SELECT pg_is_in_recovery()") == [(False,)]
    assert rows_of(instance) == marks.rows_through(1)
    assert instance.query("SELECT timeline_id FROM pg_control_checkpoint()") == [(2,)]


def test_bootstrap_refuses_a_used_directory_and_an_unreachable_target_and_writes_nothing(cluster: Cluster) -> None:
    cluster.create_table()
    cluster.backup()
    cluster.flush_archive()
    used = cluster.db_user_dir("used")
    (used / "PG_VERSION").write_text("15\n")
    result = cluster.pgvault("-q", "patroni-bootstrap", "--scope=platform", f"--datadir={used}", "--target=immediate")
    assert result.returncode == 2 and result.stderr.startswith("error: --datadir") and "not empty" in result.stderr
    assert sorted(p.name for p in used.iterdir()) == ["PG_VERSION"]

    fresh = cluster.workdir / "fresh"
    result = cluster.pgvault("-q", "patroni-bootstrap", "--scope=platform", f"--datadir={fresh}",
                             "--target-time=2001-01-01 00:00:00+00")
    assert result.returncode != 0 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert not fresh.exists()

    result = cluster.pgvault("-q", "patroni-bootstrap", "--scope=platform", f"--datadir={fresh}", "--target-tim=x")
    assert result.returncode == 2 and "--target-tim" in result.stderr and not fresh.exists()


def test_replica_method_restores_a_standby_for_patroni_and_fails_when_it_cannot(cluster: Cluster) -> None:
    cluster.create_table()
    datadir = cluster.workdir / "replica"
    # No backup yet: exit non-zero, so that Patroni falls back to basebackup; nothing left behind.
    result = cluster.pgvault("-q", "patroni-replica", "--scope=platform", "--role=replica", f"--datadir={datadir}",
                             "--connstring=", "--no_leader=True", "--keep_data=False")
    assert result.returncode != 0 and result.stderr.startswith("error:"), result.out
    assert not datadir.exists() or not any(datadir.iterdir())

    cluster.backup()
    marks = cluster.commit_batches(2)
    cluster.flush_archive()
    leader = f"host=127.0.0.1 port={cluster.pg.port} user=postgres dbname=postgres"
    result = cluster.pgvault("patroni-replica", "--scope=platform", "--role=replica", f"--datadir={datadir}",
                             f"--connstring={leader}", "--no_leader=True", "--keep_data=False")
    assert result.returncode == 0, result.out
    assert "timeline 1" in result.stderr
    assert (datadir / "standby.signal").exists() and not (datadir / "recovery.signal").exists()
    assert not PRIVATE & set(read_auto_conf(datadir))

    # Patroni would add primary_conninfo and restore_command; with the restore_command alone the
    # standby replays the archive and stays a standby.
    instance = LocalInstance.existing(datadir)
    set_auto_conf(datadir, {"restore_command": restore_command(cluster.config), "archive_mode": "off"})
    cluster.restored.append(instance)
    instance.start()
    assert instance.query("SELECT pg_is_in_recovery()") == [(True,)]
    wait_for(lambda: rows_of(instance) == marks.rows_through(1), "the standby to replay the archive", timeout=60,
             interval=0.3)
