"""Prometheus metrics tell the truth about a real repository: they match `list` and `info`, on both backends.

Also: `metrics.serve` answers over HTTP with a cache, `metrics --listen` serves from the CLI, bad
input is one line, and the pure conversion of a snapshot (verify and drill reports included) to
metric families.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import PGVAULT, Cluster, kill_group, run_pgvault, write_policy
from prometheus_client.parser import text_string_to_metric_families
from repos import S3_ENV, free_port

from pgvault.config import load_policy
from pgvault.errors import ConfigError
from pgvault.metrics import METRICS, ReportSummary, Snapshot, _latest_report, _summary, render, serve
from pgvault.pg.instance import as_db_user
from pgvault.repo import open_storage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"cluster": "test", **labels}.items())))]


def timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return parse(response.read().decode())


def test_metrics_match_what_list_and_info_say(cluster: Cluster) -> None:
    cluster.commit_batches(2)
    cluster.backup()
    cluster.commit_batches(2)
    second = cluster.backup()
    cluster.commit_batches(3)
    cluster.flush_archive()

    listed = json.loads(cluster.ok("-q", "list", "--json").stdout)
    info = json.loads(cluster.ok("-q", "info", "--json").stdout)
    result = cluster.ok("-q", "metrics")
    samples = parse(result.stdout)
    now = time.time()

    newest = listed["backups"][-1]
    assert newest["id"] == second
    assert value(samples, "pgvault_backups") == 2
    assert value(samples, "pgvault_last_backup_timestamp_seconds") == timestamp(newest["stop_time"])
    assert value(samples, "pgvault_last_backup_size_bytes") == newest["stored_size"]
    assert value(samples, "pgvault_last_backup_raw_size_bytes") == newest["raw_size"]
    assert value(samples, "pgvault_last_backup_duration_seconds") == newest["duration_s"]

    assert info["windows"], "the repository has a recoverable window"
    for window in info["windows"]:
        timeline = str(window["timeline"])
        assert value(samples, "pgvault_recoverable_window_start_timestamp_seconds",
                     timeline=timeline) == timestamp(window["earliest_time"])
        assert value(samples, "pgvault_recoverable_window_end_timestamp_seconds",
                     timeline=timeline) == timestamp(window["latest_time"])

    stored = sum(len(cluster.repo.read(key)) for key in cluster.repo.keys("test/"))
    assert value(samples, "pgvault_repository_bytes") == stored > newest["stored_size"] > 0

    # check just archived a segment: the newest WAL object is seconds old.
    archived_at = value(samples, "pgvault_wal_last_archived_timestamp_seconds")
    assert now - 120 < archived_at <= now + 5
    assert 0 <= value(samples, "pgvault_wal_archive_lag_seconds") < 120
    assert value(samples, "pgvault_collect_success") == 1

    # No verify or drill ran on this repository: their metrics are absent, not a made-up 0.
    assert not [name for name, _ in samples if name.startswith(("pgvault_verify_", "pgvault_drill_"))]
    assert {name for name, _ in samples} <= set(METRICS)
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in result.out
    assert S3_ENV["AWS_ACCESS_KEY_ID"] not in result.out

    as_json = json.loads(cluster.ok("-q", "metrics", "--json").stdout)
    assert as_json["cluster"] == "test"
    assert as_json["backups"] == 2
    assert as_json["last_backup"] == {"id": second, "stop_time": newest["stop_time"],
                                      "stored_size": newest["stored_size"], "raw_size": newest["raw_size"],
                                      "duration_s": newest["duration_s"]}
    assert as_json["windows"] == [{"timeline": w["timeline"], "start": w["earliest_time"], "end": w["latest_time"]}
                                  for w in info["windows"]]
    assert as_json["repository_bytes"] == stored
    assert as_json["verify"] is None and as_json["drill"] is None
    assert 0 <= as_json["wal"]["lag_seconds"] < 120

    # serve(): the same values over HTTP, read once per cache period however often Prometheus scrapes.
    policy = load_policy(cluster.config)
    with serve(policy, open_storage(policy.repository), "127.0.0.1:0", cache_seconds=600) as server:
        assert server.port > 0
        first = scrape(server.url)
        again = scrape(server.url)
        assert server.collector.collections == 1
        for name in ("pgvault_backups", "pgvault_last_backup_timestamp_seconds", "pgvault_last_backup_size_bytes",
                     "pgvault_last_backup_duration_seconds", "pgvault_repository_bytes",
                     "pgvault_wal_last_archived_timestamp_seconds"):
            assert value(first, name) == value(samples, name) == value(again, name), name
        assert value(first, "pgvault_recoverable_window_end_timestamp_seconds", timeline="1") == \
            value(samples, "pgvault_recoverable_window_end_timestamp_seconds", timeline="1")
        # The lag keeps counting between collections: it is computed at scrape time.
        assert value(again, "pgvault_wal_archive_lag_seconds") >= value(first, "pgvault_wal_archive_lag_seconds")
        url = server.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_serve_reads_again_after_the_cache_period_and_survives_an_unreadable_repository(cluster: Cluster) -> None:
    policy = load_policy(cluster.config)
    storage = open_storage(policy.repository)
    with serve(policy, storage, "127.0.0.1:0", cache_seconds=0.5) as server:
        assert value(scrape(server.url), "pgvault_backups") == 0  # initialized, nothing backed up yet
        cluster.backup()
        time.sleep(0.6)
        assert value(scrape(server.url), "pgvault_backups") == 1
        assert server.collector.collections == 2

    # A cluster this repository does not hold: scrapes still answer, and say the read failed.
    stranger = policy.model_copy(update={"cluster": "stranger"})
    with serve(stranger, storage, "127.0.0.1:0") as server:
        samples = scrape(server.url)
        assert samples == {("pgvault_collect_success", (("cluster", "stranger"),)): 0.0}


def test_metrics_listen_serves_from_the_command_line(cluster: Cluster) -> None:
    cluster.backup()
    port = free_port()
    proc = subprocess.Popen(as_db_user([PGVAULT, "--config", str(cluster.config), "metrics", "--listen",
                                        f"127.0.0.1:{port}"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd="/tmp")
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "metrics --listen did not start listening"
            time.sleep(0.2)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "pgvault_backups") == 1
        assert value(samples, "pgvault_collect_success") == 1
    finally:
        kill_group(proc)
    assert f"serving metrics of cluster test at http://127.0.0.1:{port}/metrics" in proc.stderr.read().decode()


def test_bad_metrics_input_is_one_line_with_the_right_exit_code(cluster: Cluster, workdir: Path) -> None:
    result = cluster.pgvault("metrics", "--listen", "9188")
    assert result.returncode == 2
    assert "'9188' is not HOST:PORT" in result.stderr and "Traceback" not in result.out

    result = cluster.pgvault("metrics", "--listen", "127.0.0.1:9188", "--json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: give --json or --listen, not both")

    other = workdir / "other.yaml"
    write_policy(other, "other", cluster.pg.conninfo(), cluster.repo)
    result = run_pgvault("metrics", config=other)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: cluster 'other' is not initialized in this repository"
    assert result.stdout == ""

    policy = load_policy(cluster.config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=re.escape("cannot serve metrics on 127.0.0.1:")):
            serve(policy, open_storage(policy.repository), f"127.0.0.1:{taken.getsockname()[1]}")
    with pytest.raises(ConfigError, match=re.escape("schedule.metrics_listen: 'localhost' is not HOST:PORT")):
        serve(policy, open_storage(policy.repository), "localhost")


# The snapshot -> metrics conversion, without a repository ---------------------------------------


def test_verify_and_drill_reports_become_metrics() -> None:
    finished = datetime(2026, 11, 26, 4, 30, tzinfo=UTC)
    snapshot = Snapshot(
        cluster="test", collected_at=finished, collect_seconds=0.25, backups=0, last_backup=None,
        wal_last_archived=finished - timedelta(minutes=20), repository_bytes=123,
        verify=_summary({"ok": False, "finished": finished.isoformat(), "problems": ["part damaged"]}),
        drill=_summary({"ok": True, "finished_at": finished.isoformat(), "rto_seconds": 42.5, "rpo_seconds": 3}),
    )
    samples = parse(render("test", snapshot, now=finished.timestamp()))

    assert value(samples, "pgvault_verify_last_success") == 0
    assert value(samples, "pgvault_verify_last_timestamp_seconds") == finished.timestamp()
    assert value(samples, "pgvault_drill_last_success") == 1
    assert value(samples, "pgvault_drill_last_timestamp_seconds") == finished.timestamp()
    assert value(samples, "pgvault_drill_last_rto_seconds") == 42.5
    assert value(samples, "pgvault_drill_last_rpo_seconds") == 3
    assert value(samples, "pgvault_wal_archive_lag_seconds") == 20 * 60
    assert ("pgvault_last_backup_timestamp_seconds", (("cluster", "test"),)) not in samples

    # A report without a verdict shows no verdict, rather than a made-up success or failure.
    unknown = replace(snapshot, verify=ReportSummary(ok=None, finished=None), drill=None)
    names = {name for name, _ in parse(render("test", unknown, now=finished.timestamp()))}
    assert not {n for n in names if n.startswith(("pgvault_verify_", "pgvault_drill_"))}


def test_a_missing_report_reader_means_no_report() -> None:
    assert _latest_report("pgvault.not_written_yet", "latest_report", None, "test") is None  # type: ignore[arg-type]
    assert _latest_report("pgvault.errors", "latest_report", None, "test") is None  # type: ignore[arg-type]


def test_the_newest_verify_and_drill_reports_show_in_the_metrics(cluster: Cluster) -> None:
    cluster.commit_batches(2)
    cluster.backup()
    cluster.commit_batches(2)
    cluster.flush_archive()
    verified = json.loads(cluster.ok("-q", "verify", "--json").stdout)
    drilled = json.loads(cluster.ok("-q", "drill", "--json").stdout)

    samples = parse(cluster.ok("-q", "metrics").stdout)

    assert value(samples, "pgvault_verify_last_success") == float(verified["ok"]) == 1
    assert value(samples, "pgvault_verify_last_timestamp_seconds") == timestamp(verified["finished"])
    assert value(samples, "pgvault_drill_last_success") == float(drilled["ok"]) == 1
    assert value(samples, "pgvault_drill_last_timestamp_seconds") == timestamp(drilled["finished_at"])
    assert value(samples, "pgvault_drill_last_rto_seconds") == drilled["rto_seconds"] > 0
    assert value(samples, "pgvault_drill_last_rpo_seconds") == drilled["rpo_seconds"]
