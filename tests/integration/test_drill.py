"""DR drills against real PostgreSQL: the drill's verdict, its numbers, and that it always cleans up.

Shared history (one per backend):   batches 1-2 | backup | batches 3-6 | flush
marks[i] are the batches after the backup: marks[0] is batch 3, ..., marks[3] is batch 6.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PGVAULT, Cluster, Marks, make_workdir, new_cluster, processes_in, run_pgvault
from repos import flip_byte

from pgvault.pg.instance import chown_to_db_user

pytestmark = [pytest.mark.integration]

Rows = list[tuple[int, int]]
PAUSE = 0.4
STEPS = ["plan", "restore", "recover", "amcheck", "checks", "measure", "cleanup"]


@dataclass
class History:
    cluster: Cluster
    before: Marks  # committed before the backup
    marks: Marks  # committed after it
    backup: dict[str, Any]

    def rows_through(self, index: int) -> Rows:
        return self.marks.rows_through(index, self.before.rows_through(len(self.before) - 1))


@pytest.fixture(scope="module")
def history(backend: str) -> Iterator[History]:
    workdir = make_workdir()
    # No autovacuum: its commits would be the last replayed transaction instead of our last batch.
    cluster = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"})
    try:
        # The backed-up pg_hba.conf refuses every socket connection (as production ones may refuse
        # passwordless ones): the drill's copy must get in regardless. The live cluster uses TCP.
        hba = cluster.pg.pgdata / "pg_hba.conf"
        hba.write_text("local all all reject\n" + hba.read_text())
        cluster.sql("SELECT pg_reload_conf()")
        cluster.create_table()
        before = cluster.commit_batches(2, pause=PAUSE)
        backup = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        marks = cluster.commit_batches(4, pause=PAUSE)
        cluster.flush_archive()
        yield History(cluster, before, marks, backup)
    finally:
        with contextlib.suppress(Exception):
            cluster.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


# ---- helpers ------------------------------------------------------------------------------------

def drill_policy(cluster: Cluster, name: str, **drill: Any) -> tuple[Path, Path]:
    """A copy of the cluster's policy with a drill section; scratch copies go to a directory of its own."""
    data = yaml.safe_load(cluster.config.read_text())
    scratch = cluster.db_user_dir(f"scratch-{name}")
    data["drill"] = {"scratch_dir": str(scratch), **drill}
    path = cluster.workdir / f"drill-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    chown_to_db_user(path)
    return path, scratch


def rows_text(rows: Rows) -> str:
    return ",".join(f"{b}:{n}" for b, n in rows)


ROWS_QUERY = "SELECT string_agg(batch || ':' || n, ',' ORDER BY batch, n) FROM t"


def assert_cleaned_up(scratch: Path) -> None:
    assert list(scratch.iterdir()) == [], "the drill left its scratch directory behind"
    assert processes_in(scratch) == [], "the drill left processes behind"


def drill_keys(cluster: Cluster) -> list[str]:
    return cluster.repo.keys("test/drills/")


def stored_report(cluster: Cluster, key: str) -> dict[str, Any]:
    return json.loads(cluster.repo.read(key))


# ---- a drill that passes ------------------------------------------------------------------------

def test_drill_to_a_target_passes_and_its_checks_see_exactly_the_rows_committed_before_it(
        history: History) -> None:
    index = 1
    expected = history.rows_through(index)
    target = history.marks[index].between_next
    config, scratch = drill_policy(history.cluster, "target", checks=[
        {"name": "row count", "query": "SELECT count(*) FROM t", "expect": str(len(expected))},
        {"name": "exact rows", "query": ROWS_QUERY, "expect": rows_text(expected)},
    ])

    result = run_pgvault("drill", "--target-time", target.isoformat(), "--json", config=config)

    assert result.returncode == 0, result.out
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["failures"] == []
    assert report["backup"]["id"] == history.backup["id"]
    assert [(c["name"], c["got"], c["ok"]) for c in report["checks"]] == [
        ("row count", str(len(expected)), True), ("exact rows", rows_text(expected), True)]
    assert report["amcheck"]["ok"] is True and report["amcheck"]["exit_code"] == 0
    assert {"postgres", "template1"} <= set(report["amcheck"]["databases"])
    assert [s["name"] for s in report["steps"]] == STEPS and all(s["ok"] for s in report["steps"])
    # RPO: the target minus the last commit recovery replayed, which is the last batch before the target.
    last = datetime.fromisoformat(report["last_replayed_at"])
    assert history.marks[index].committed_at - timedelta(seconds=1) <= last <= history.marks[index].committed_at
    assert report["rpo_reference"] == target.isoformat()
    assert report["rpo_seconds"] == pytest.approx((target - last).total_seconds(), abs=0.001)
    assert 0 < report["rpo_seconds"] < PAUSE + 1
    # RTO: from the drill's start until the copy answered, i.e. planning, restoring and recovering.
    until_answer = sum(s["seconds"] for s in report["steps"] if s["name"] in ("plan", "restore", "recover"))
    # The recover step closes a moment after the RTO is taken inside it, and each figure is rounded.
    assert until_answer - 0.05 <= report["rto_seconds"] <= until_answer + 2
    assert report["sizes"] == {"backup_stored_bytes": history.backup["stored_size"],
                               "backup_raw_bytes": history.backup["raw_size"],
                               "restored_bytes": report["sizes"]["restored_bytes"]}
    assert report["sizes"]["restored_bytes"] > 0
    assert report["cleaned_up"] is True
    assert report["report_key"] == f"test/drills/{report['id']}.json"
    assert stored_report(history.cluster, report["report_key"]) == report
    assert_cleaned_up(scratch)


def test_drill_api_without_target_recovers_the_whole_archive_and_measures_rpo_from_its_start(
        history: History) -> None:
    # The scheduler calls run_drill in-process (here as root); the CLI runs it as the database user.
    from pgvault.config import load_policy
    from pgvault.drill import latest_drill_report, run_drill
    from pgvault.repo import open_storage

    everything = history.rows_through(len(history.marks) - 1)
    config, scratch = drill_policy(history.cluster, "api", checks=[
        {"name": "exact rows", "query": ROWS_QUERY, "expect": rows_text(everything)}])
    policy = load_policy(config)
    storage = open_storage(policy.repository)
    messages: list[str] = []

    report = run_drill(policy, storage, progress=messages.append)

    assert report.ok, report.failures
    assert [c.got for c in report.checks] == [rows_text(everything)]
    assert report.rpo_reference == report.started_at
    last = report.last_replayed_at
    assert last is not None
    assert history.marks[-1].committed_at - timedelta(seconds=1) <= last <= history.marks[-1].committed_at
    assert report.rpo_seconds == pytest.approx((report.started_at - last).total_seconds())
    assert report.rto_seconds is not None and report.rto_seconds > 0
    assert any("drill: recover" in m for m in messages)
    assert latest_drill_report(storage, "test") == report.as_dict()
    assert_cleaned_up(scratch)


@pytest.mark.file_only
def test_a_tablespace_is_drilled_inside_the_scratch_directory_never_over_the_live_one(workdir: Path,
                                                                                    backend: str) -> None:
    cluster = new_cluster(workdir, backend=backend)
    try:
        location = cluster.db_user_dir("ts_live")
        cluster.sql(f"CREATE TABLESPACE ts_live LOCATION '{location}'")
        cluster.sql("CREATE TABLE t_ts (batch int NOT NULL, n int NOT NULL) TABLESPACE ts_live")
        cluster.commit_batches(2, table="t_ts")
        cluster.backup()
        cluster.commit_batches(1, table="t_ts")
        cluster.flush_archive()
        live_before = sorted(str(p) for p in location.rglob("*"))
        config, scratch = drill_policy(cluster, "tablespace", checks=[
            {"name": "rows in the tablespace", "query": "SELECT count(*) FROM t_ts", "expect": "15"},
            {"name": "its location", "expect": "t",
             "query": "SELECT pg_tablespace_location(oid) LIKE '%/pgvault-drill-%/tablespaces/%' "
                      "FROM pg_tablespace WHERE spcname = 'ts_live'"}])

        result = run_pgvault("drill", "--json", config=config)

        assert result.returncode == 0, result.out
        assert [c["ok"] for c in json.loads(result.stdout)["checks"]] == [True, True]
        assert sorted(str(p) for p in location.rglob("*")) == live_before
        assert cluster.query("SELECT count(*) FROM t_ts") == [(15,)]
        assert_cleaned_up(scratch)
    finally:
        cluster.pg.stop(mode="immediate")


@pytest.mark.file_only
def test_a_cluster_whose_postgresql_conf_is_not_in_its_data_directory_can_be_drilled(workdir: Path,
                                                                                    backend: str) -> None:
    cluster = new_cluster(workdir, backend=backend)
    try:
        # As Debian does it: the configuration lives outside the data directory, so the backup has
        # none, and the original ran with more connections than the copy's defaults allow a hot standby.
        conf = cluster.pg.pgdata / "postgresql.conf"
        conf.write_text(conf.read_text() + "max_connections = 150\n")
        cluster.pg.stop()
        cluster.pg.start()
        conf.unlink()  # the running server read it at start
        cluster.create_table()
        cluster.commit_batches(1)
        cluster.backup()
        cluster.commit_batches(1)
        cluster.flush_archive()
        config, scratch = drill_policy(cluster, "debian", checks=[
            {"name": "rows", "query": "SELECT count(*) FROM t", "expect": "10"},
            {"name": "defaults", "query": "SHOW max_connections", "expect": "100"}])

        result = run_pgvault("drill", "--json", config=config)

        assert result.returncode == 0, result.out
        assert "the backup has no postgresql.conf" in result.stderr
        assert [c["ok"] for c in json.loads(result.stdout)["checks"]] == [True, True]
        assert_cleaned_up(scratch)
    finally:
        cluster.pg.stop(mode="immediate")


# ---- drills that fail ---------------------------------------------------------------------------

def test_a_check_that_differs_fails_the_drill_naming_the_check_and_both_values(history: History) -> None:
    everything = history.rows_through(len(history.marks) - 1)
    config, scratch = drill_policy(history.cluster, "badcheck", amcheck=False, checks=[
        {"name": "row count", "query": "SELECT count(*) FROM t", "expect": "999"},
        {"name": "orders", "query": "SELECT count(*) FROM orders", "expect": "1"},
        {"name": "exact rows", "query": ROWS_QUERY, "expect": rows_text(everything)},
    ])
    before = drill_keys(history.cluster)

    result = run_pgvault("drill", config=config)

    assert result.returncode == 1, result.out
    assert (f"error: drill failed: check 'row count' (database postgres): expected '999', got "
            f"'{len(everything)}' (and 1 more failure(s))") in result.stderr
    assert "DR drill of cluster test: FAILED" in result.stdout
    assert f"row count                FAILED expected '999', got '{len(everything)}'" in result.stdout
    assert "amcheck       off (drill.amcheck: false)" in result.stdout
    [key] = sorted(set(drill_keys(history.cluster)) - set(before))
    report = stored_report(history.cluster, key)
    assert report["ok"] is False
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [
        ("row count", False), ("orders", False), ("exact rows", True)]
    assert 'relation "orders" does not exist' in report["checks"][1]["error"]
    assert report["failures"][1].startswith("check 'orders' (database postgres) failed: ")
    assert_cleaned_up(scratch)


def test_a_corrupt_backup_fails_the_drill_naming_the_part(workdir: Path, backend: str) -> None:
    cluster = new_cluster(workdir, backend=backend)
    try:
        cluster.create_table()
        cluster.commit_batches(2)
        backup_id = cluster.backup()
        cluster.commit_batches(1)
        cluster.flush_archive()
        part = next(k for k in cluster.repo.keys(f"test/backups/{backup_id}/") if "/part-" in k)
        flip_byte(cluster.repo, part)
        config, scratch = drill_policy(cluster, "corrupt", checks=[
            {"name": "rows", "query": "SELECT count(*) FROM t", "expect": "15"}])

        result = run_pgvault("drill", "--json", config=config)

        assert result.returncode == 1, result.out
        assert f"error: drill failed: restore: object {part} does not match the SHA-256" in result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is False and len(report["failures"]) == 1
        assert [(s["name"], s["ok"]) for s in report["steps"]] == [
            ("plan", True), ("restore", False), ("cleanup", True)]
        assert report["rto_seconds"] is None and report["checks"] == []
        assert report["amcheck"]["ok"] is None
        assert stored_report(cluster, report["report_key"]) == report
        assert_cleaned_up(scratch)
    finally:
        cluster.pg.stop(mode="immediate")


def test_a_corrupt_wal_segment_fails_the_drill_with_the_servers_reason(workdir: Path, backend: str) -> None:
    cluster = new_cluster(workdir, backend=backend)
    try:
        cluster.create_table()
        backup = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        cluster.commit_batches(2)
        cluster.flush_archive()
        # The newest segment: replayed after the copy is consistent, so only the recovery can notice.
        wal = [k for k in cluster.repo.keys("test/wal/") if k.endswith(".zst")]
        newest = max(wal)
        assert newest.rsplit("/", 1)[-1].removesuffix(".zst") > backup["stop_wal"]
        flip_byte(cluster.repo, newest)
        segment = newest.rsplit("/", 1)[-1].removesuffix(".zst")
        config, scratch = drill_policy(cluster, "badwal")

        result = run_pgvault("-q", "drill", "--json", config=config)

        assert result.returncode == 1, result.out
        headline = result.stderr.splitlines()[0]
        assert headline == (f'error: drill failed: recover: the server failed: could not restore file "{segment}" '
                            "from archive: child process exited with exit code 255")
        report = json.loads(result.stdout)
        assert f"object {newest} does not match its recorded SHA-256" in report["failures"][0]
        assert report["rto_seconds"] is None
        assert_cleaned_up(scratch)
    finally:
        cluster.pg.stop(mode="immediate")


@pytest.mark.file_only
def test_amcheck_finds_a_corrupt_index_that_backup_and_restore_carry_faithfully(workdir: Path,
                                                                                 backend: str) -> None:
    # No autovacuum: nothing commits after the backup, so RPO falls back to the backup's start.
    cluster = new_cluster(workdir, backend=backend, settings={"autovacuum": "off"})
    try:
        # An index built under one ordering, then its comparison function reversed: every page is
        # intact (checksums, backup and restore see nothing wrong) but the B-tree order is broken.
        cluster.sql("""
            CREATE FUNCTION rev_cmp(int, int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT btint4cmp($1, $2)';
            CREATE OPERATOR CLASS rev_ops FOR TYPE int USING btree AS OPERATOR 1 <, OPERATOR 2 <=,
                OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 rev_cmp(int, int);
            CREATE TABLE bad (n int);
            INSERT INTO bad SELECT generate_series(1, 1000);
            CREATE INDEX bad_idx ON bad (n rev_ops);
            CREATE OR REPLACE FUNCTION rev_cmp(int, int) RETURNS int LANGUAGE sql IMMUTABLE
                AS 'SELECT btint4cmp($2, $1)';
        """)
        backup = json.loads(cluster.ok("-q", "backup", "--json").stdout)
        cluster.flush_archive()
        config, scratch = drill_policy(cluster, "amcheck")

        result = run_pgvault("drill", "--json", config=config)

        assert result.returncode == 1, result.out
        assert 'error: drill failed: pg_amcheck found corruption: btree index "postgres.public.bad_idx":' \
            in result.stderr
        report = json.loads(result.stdout)
        assert report["amcheck"]["ok"] is False and report["amcheck"]["exit_code"] == 2
        assert 'item order invariant violated for index "bad_idx"' in report["amcheck"]["output"]
        assert report["rto_seconds"] > 0  # the restore itself worked
        assert report["last_replayed_at"] is None
        started = datetime.fromisoformat(report["started_at"])
        assert report["rpo_seconds"] == pytest.approx(
            (started - datetime.fromisoformat(backup["start_time"])).total_seconds(), abs=0.001)
        assert_cleaned_up(scratch)
    finally:
        cluster.pg.stop(mode="immediate")


@pytest.mark.file_only
def test_checks_are_bounded_by_the_drill_timeout(history: History) -> None:
    config, scratch = drill_policy(history.cluster, "timeout", amcheck=False, timeout="20s", checks=[
        {"name": "slow", "query": "SELECT pg_sleep(120)", "expect": ""}])
    started = time.monotonic()

    result = run_pgvault("drill", config=config)

    assert result.returncode == 1, result.out
    assert time.monotonic() - started < 60
    assert "error: drill failed: check 'slow' (database postgres) failed: canceling statement due to " \
        "statement timeout" in result.stderr
    assert_cleaned_up(scratch)


def test_an_unreachable_target_is_refused_and_stores_nothing(history: History) -> None:
    config, scratch = drill_policy(history.cluster, "unreachable")
    before = drill_keys(history.cluster)
    future = datetime.now(UTC) + timedelta(hours=1)

    result = run_pgvault("drill", "--target-time", future.isoformat(), config=config)

    assert result.returncode == 1, result.out
    assert "is after the last archived WAL" in result.stderr
    assert result.stdout == ""
    assert drill_keys(history.cluster) == before
    assert_cleaned_up(scratch)


def test_a_repository_without_the_cluster_is_refused_before_anything_is_created(workdir: Path) -> None:
    scratch = workdir / "scratch"
    scratch.mkdir()
    chown_to_db_user(scratch)
    config = workdir / "empty.yaml"
    config.write_text(yaml.safe_dump({"cluster": "test", "postgres": {"conninfo": "host=127.0.0.1"},
                                      "repository": {"url": f"file://{workdir}/repo"},
                                      "drill": {"scratch_dir": str(scratch)}}))
    chown_to_db_user(config)

    result = run_pgvault("drill", config=config)

    assert result.returncode == 1
    assert "error: cluster 'test' is not initialized in this repository" in result.stderr
    assert not (workdir / "repo").exists()
    assert_cleaned_up(scratch)


def test_the_copys_policy_names_exactly_the_drilled_repository_secrets_included() -> None:
    # The copy's restore_command loads this file: it must reach the same repository the same way.
    from pgvault.config import parse_policy
    from pgvault.drill import _scratch_policy

    policy = parse_policy({
        "cluster": "test", "postgres": {"conninfo": "host=db.example.net password=pg-secret"},
        "repository": {"url": "s3://bucket/prefix", "s3": {
            "endpoint_url": "https://minio.example.net:9000", "region": "eu-central-1",
            "access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3-secret", "session_token": "token-secret",
            "multipart_chunk_size": "8MiB", "connect_timeout": "7s", "read_timeout": "2m",
            "retry_window": "90s", "retries": 3, "conditional_writes": False}}}, "policy")

    data = _scratch_policy(policy, "host=/tmp/x/sock port=5432 user=postgres")

    copy = parse_policy(data, "copy")
    assert copy.repository == policy.repository
    assert copy.repository.s3 is not None and copy.repository.s3.secret_access_key is not None
    assert copy.repository.s3.secret_access_key.get_secret_value() == "s3-secret"
    assert "pg-secret" not in str(data)  # the production conninfo is not needed and not copied


# ---- interrupted drills -------------------------------------------------------------------------

@pytest.mark.file_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_drill_stops_and_removes_its_copy(history: History, sig: signal.Signals) -> None:
    config, scratch = drill_policy(history.cluster, f"signal-{sig.name}", amcheck=False, checks=[
        {"name": "slow", "query": "SELECT pg_sleep(120)", "expect": ""}])
    before = drill_keys(history.cluster)
    stderr = history.cluster.workdir / f"drill-{sig.name}.err"
    user = pwd.getpwnam("postgres")
    # Straight as postgres, not through runuser: the signal must reach pgvault itself.
    with stderr.open("w") as err:
        proc = subprocess.Popen([PGVAULT, "--config", str(config), "drill"], stdout=subprocess.DEVNULL,
                                stderr=err, cwd="/tmp", user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    try:
        deadline = time.monotonic() + 120
        while "drill: check 'slow'" not in stderr.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        assert processes_in(scratch), "the running drill's copy should be visible"

        proc.send_signal(sig)
        returncode = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert returncode == 130, stderr.read_text()
    assert stderr.read_text().rstrip().endswith("interrupted")
    assert drill_keys(history.cluster) == before
    assert_cleaned_up(scratch)


# ---- bad settings -------------------------------------------------------------------------------

@pytest.mark.parametrize(("drill", "message"), [
    ({"scratch_dir": "drills"}, "drill.scratch_dir: 'drills' is not an absolute path; write e.g. "
                                "/srv/pgvault-drills"),
    ({"checks": [{"name": "n", "query": "SELECT 1", "expect": 1}]}, "drill.checks.0.expect must be text "
                                                                     "(quote it), not 1"),
], ids=["relative-scratch-dir", "unquoted-expect"])
def test_bad_drill_settings_are_refused_in_one_line(workdir: Path, drill: dict[str, Any], message: str) -> None:
    config = workdir / "bad.yaml"
    config.write_text(yaml.safe_dump({"cluster": "test", "postgres": {"conninfo": "host=127.0.0.1"},
                                      "repository": {"url": f"file://{workdir}/repo"}, "drill": drill}))
    chown_to_db_user(config)

    result = run_pgvault("drill", config=config)

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: {config}: {message}"
    assert not (workdir / "repo").exists()


def test_a_bad_target_time_is_a_usage_error(workdir: Path) -> None:
    result = run_pgvault("drill", "--target-time", "yesterday", config=workdir / "none.yaml")

    assert result.returncode == 2
    assert "error: Invalid value for '--target-time': 'yesterday' is not a time" in result.stderr
