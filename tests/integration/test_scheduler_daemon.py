"""The scheduler against real things: separate processes, real locks on both backends, a real
`pgvault schedule run` stopped by SIGTERM in the middle of a real backup, and a fake Patroni that is
a real HTTP server on 127.0.0.1.

Jobs are fake where the test is about scheduling (who runs what, when, never two at once); the
SIGTERM test runs the real backup job, made to wait by blocked archiving. Time runs fast through
a ScaledClock (fake time = real time x speed, from one origin shared by every process), so
processes that never talk to each other still agree on what time it is.

(This file is tests/integration/test_scheduler_daemon.py rather than test_scheduler.py: two test
modules with one basename collide under pytest's default import mode, and tests/unit has
test_scheduler.py.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import Cluster, archiving_blocked, new_repo, run_pgvault, wait_for, write_policy
from repos import RepoHandle, free_port

from pgvault.config import Policy, load_policy, parse_policy
from pgvault.pg.instance import chown_to_db_user
from pgvault.repo import job_lock, open_storage
from pgvault.repo.base import Storage
from pgvault.repo.layout import Layout
from pgvault.scheduler import (
    Job,
    JobEvent,
    JobOutcome,
    JobRecord,
    JobRun,
    SchedulerState,
    StateStore,
    build_scheduler,
    latest_slot,
    stop_on_signals,
)

pytestmark = [pytest.mark.integration]

CLUSTER = "test"
PYTHON = str(Path(sys.executable).parent.resolve() / "python")
PGVAULT = str(Path(sys.executable).parent.resolve() / "pgvault")
HERE = Path(__file__).resolve().parent
UTC_ZONE = ZoneInfo("UTC")
# No metrics server in tests: several schedulers run at once and would all want port 9188.
QUIET = {"metrics_listen": ""}


class ScaledClock:
    """Fake time running `speed` times faster than real time from a shared origin."""

    def __init__(self, origin_fake: datetime, origin_real: float, speed: float) -> None:
        self.origin_fake, self.origin_real, self.speed = origin_fake, origin_real, speed

    def now(self) -> datetime:
        return self.origin_fake + timedelta(seconds=(time.time() - self.origin_real) * self.speed)

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        while not stop.is_set():
            remaining = (when - self.now()).total_seconds() / self.speed
            if remaining <= 0:
                break
            stop.wait(min(remaining, 0.5))
        return stop.is_set()


def policy_for(repo: RepoHandle, **schedule: Any) -> Policy:
    return parse_policy({"cluster": CLUSTER, "postgres": {"conninfo": "host=127.0.0.1 port=1"},
                         "repository": repo.section(), "schedule": {**QUIET, **schedule}}, "test")


def seed_state(storage: Storage, created: datetime, settled: dict[str, datetime] | None = None) -> None:
    """A state as a scheduler that ran before would have left: created then, some jobs settled."""
    jobs = {name: JobRecord(slot=slot, status="ok", member="earlier", last_ok=slot)
            for name, slot in (settled or {}).items()}
    StateStore(storage, CLUSTER).write(SchedulerState(created=created, jobs=jobs))


def lock_is_free(policy: Policy, storage: Storage, job: str) -> bool:
    try:
        with job_lock(policy.repository, storage, CLUSTER, job):
            return True
    except Exception:
        return False


# ---- one job at a time, across processes ----------------------------------------------------------------

FAKE_START = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
SPEED = 3600.0  # a fake hour per real second
JOB_SECONDS = 0.25  # real seconds each fake job takes (15 fake minutes)


def child_main(policy_path: str, origin_real: str, journal: str) -> None:
    """One scheduler process of the overlap test: hourly backup and verify, both fake and journaled."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s [{os.getpid()}] %(message)s")
    policy = load_policy(Path(policy_path))

    def journaled(name: str) -> Callable[[JobRun], JobOutcome]:
        def run(job_run: JobRun) -> JobOutcome:
            entry = {"pid": os.getpid(), "job": name, "slot": job_run.slot.isoformat(), "start": time.time()}
            time.sleep(JOB_SECONDS)
            entry["end"] = time.time()
            with open(journal, "a") as out:  # one small append per run: whole lines, never interleaved
                out.write(json.dumps(entry) + "\n")
            return JobOutcome(True)
        return run

    jobs = [Job("backup", journaled("backup"), cron="0 * * * *"), Job("verify", journaled("verify"), cron="30 * * * *")]
    scheduler = build_scheduler(policy, open_storage(policy.repository), jobs=jobs,
                                clock=ScaledClock(FAKE_START, float(origin_real), SPEED))
    scheduler.lock_poll = timedelta(seconds=0.05 * SPEED)  # every 50 ms of real time
    stop = threading.Event()
    with stop_on_signals(scheduler, stop):
        scheduler.run(stop)


CHILD = ("import sys; sys.path[:0] = sys.argv[1:3]; from test_scheduler_daemon import child_main; "
         "child_main(*sys.argv[3:])")


def test_two_scheduler_processes_on_one_repository_never_run_two_jobs_at_once(workdir: Path, backend: str) -> None:
    repo = new_repo(workdir, backend, "overlap")
    config = workdir / "overlap.yaml"
    write_policy(config, CLUSTER, "host=127.0.0.1 port=1", repo, schedule=QUIET)
    journal = workdir / "journal.jsonl"
    origin = time.time() + 1.0  # both processes start their fake clocks at the same real moment
    procs = [subprocess.Popen([PYTHON, "-c", CHILD, str(HERE.parent), str(HERE), str(config), str(origin),
                               str(journal)], stderr=subprocess.PIPE, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        time.sleep(1.0 + 6.5)  # fake 00:00:30 to about 06:30: six backup slots, six verify slots
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(errors)
    runs = [json.loads(line) for line in journal.read_text().splitlines()]
    # Never two at once: sorted by start, each run ends before the next begins.
    runs.sort(key=lambda r: r["start"])
    for before, after in itertools.pairwise(runs):
        assert before["end"] <= after["start"], f"{before} overlaps {after}"
    # Each slot ran exactly once, whichever process took it.
    slots = [(r["job"], r["slot"]) for r in runs]
    assert len(slots) == len(set(slots)), f"a slot ran twice: {sorted(slots)}"
    assert {job for job, _ in slots} == {"backup", "verify"}
    for name in ("backup", "verify"):  # every hour's slot, none skipped (the first may be before 00:00:30)
        hours = sorted(datetime.fromisoformat(slot) for job, slot in slots if job == name)
        assert len(hours) >= 5 and all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(hours)), hours
    assert all("Traceback" not in err for err in errors), "\n".join(errors)
    policy = policy_for(repo)
    assert lock_is_free(policy, open_storage(policy.repository), "scheduler")


# ---- stale locks -----------------------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from pgvault.config import load_policy
from pgvault.repo import job_lock, open_storage
policy = load_policy(Path(sys.argv[1]))
with job_lock(policy.repository, open_storage(policy.repository), policy.cluster, "scheduler"):
    print("held", flush=True)
    time.sleep(600)
"""


@dataclass
class Node:
    """An in-process scheduler with a fake backup job, as one node of the cluster."""

    name: str
    policy: Policy
    clock: Any
    ran: list[str]
    events: list[JobEvent] = field(default_factory=list)
    job_seconds: float = 0.0

    def scheduler(self) -> Any:
        def backup(job_run: JobRun) -> JobOutcome:
            self.ran.append(job_run.member)
            time.sleep(self.job_seconds)
            return JobOutcome(True, f"backup on {job_run.member}")

        made = build_scheduler(self.policy, open_storage(self.policy.repository),
                               jobs=[Job("backup", backup, cron=self.policy.schedule.backup, ha=True)],
                               clock=self.clock)
        made.lock_poll = timedelta(seconds=5)
        made.on_result.append(self.events.append)
        return made


SLOT = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def test_a_lock_holder_killed_with_sigkill_does_not_block_the_scheduler(workdir: Path, backend: str) -> None:
    from pgvault.scheduler import FakeClock

    repo = new_repo(workdir, backend, "stale")
    config = workdir / "stale.yaml"
    write_policy(config, CLUSTER, "host=127.0.0.1 port=1", repo, schedule=QUIET)
    policy = load_policy(config)
    seed_state(open_storage(policy.repository), created=SLOT - timedelta(hours=1))
    node = Node("node1", policy, FakeClock(SLOT + timedelta(minutes=1)), ran=[])
    holder = subprocess.Popen([PYTHON, "-c", HOLD, str(config)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # A live holder: the slot is left to it.
        events = node.scheduler().run_due(threading.Event(), wait=False)
        assert [(e.job, e.result) for e in events] == [("backup", "busy")]
        assert node.ran == []
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # Its process is gone (the flock went with it; on S3 its lease names a dead pid of this host).
    started = time.monotonic()
    events = node.scheduler().run_due(threading.Event(), wait=False)
    assert [(e.job, e.result) for e in events] == [("backup", "ok")]
    assert node.ran == [node.scheduler().member]
    assert time.monotonic() - started < 10


@pytest.mark.s3_only
def test_an_expired_lease_of_another_host_is_taken_over_and_a_live_one_is_not(workdir: Path, backend: str) -> None:
    from pgvault.scheduler import FakeClock

    repo = new_repo(workdir, backend, "lease")
    policy = policy_for(repo)
    storage = open_storage(policy.repository)
    seed_state(storage, created=SLOT - timedelta(hours=1))
    key = f"{CLUSTER}/locks/scheduler.lock"

    def lease(expires_in: float) -> None:
        import io

        storage.delete([key])
        storage.put(key, io.BytesIO(json.dumps({"token": "other", "pid": 4242, "host": "node9.example",
                                                "since": int(time.time()) - 3600,
                                                "expires": time.time() + expires_in}).encode()))

    node = Node("node1", policy, FakeClock(SLOT + timedelta(minutes=1)), ran=[])
    lease(expires_in=100)  # held by a process on another host, renewed recently
    events = node.scheduler().run_due(threading.Event(), wait=False)
    assert [(e.job, e.result) for e in events] == [("backup", "busy")]
    assert "pid 4242 on node9.example" in events[0].detail
    lease(expires_in=-5)  # that host stopped renewing it
    events = node.scheduler().run_due(threading.Event(), wait=False)
    assert [(e.job, e.result) for e in events] == [("backup", "ok")]
    assert not repo.exists(key)  # released after the job


# ---- HA: a fake Patroni, three nodes ---------------------------------------------------------------------

@dataclass
class FakePatroni:
    """GET /cluster on 127.0.0.1, answering what `members` holds; counts the requests."""

    members: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        patroni = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                patroni.requests += 1
                if self.path != "/cluster":
                    self.send_error(404)
                    return
                body = json.dumps({"members": patroni.members, "scope": "demo"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def member(name: str, role: str, state: str, lag: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "role": role, "state": state, "api_url": f"http://{name}:8008/patroni",
                            "host": name, "port": 5432, "timeline": 2}
    if role != "leader":
        data["lag"] = "unknown" if lag is None else lag
    return data


MiB = 1024 * 1024
SCENARIOS = {
    "healthy replicas: the first by name": (
        "replica", [member("node1", "leader", "running"), member("node2", "replica", "streaming", 0),
                    member("node3", "replica", "streaming", 4096)], "node2", "node2 is a healthy replica"),
    "replicas lag or stopped: the leader": (
        "replica", [member("node1", "leader", "running"), member("node2", "replica", "streaming", 200 * MiB),
                    member("node3", "replica", "stopped")], "node1", "node1 is the leader; no replica is healthy"),
    "backup_from leader": (
        "leader", [member("node1", "leader", "running"), member("node2", "replica", "streaming", 0),
                   member("node3", "sync_standby", "streaming", 0)], "node1", "node1 is the leader (backup_from"),
    "after a failover: node3 leads, node1 streams": (
        "replica", [member("node1", "replica", "streaming", 0), member("node2", "replica", "starting"),
                    member("node3", "leader", "running")], "node1", "node1 is a healthy replica"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_three_nodes_take_exactly_one_backup_on_the_member_the_policy_picks(workdir: Path, backend: str,
                                                                           scenario: str) -> None:
    backup_from, members, expected, reason = SCENARIOS[scenario]
    patroni = FakePatroni(members)
    repo = new_repo(workdir, backend, f"ha-{list(SCENARIOS).index(scenario)}")
    dead = f"http://127.0.0.1:{free_port()}"  # the first URL does not answer: the next one is asked
    with patroni.serving() as url:
        ran: list[str] = []
        origin = time.time()
        nodes = [Node(name, policy_for(repo, member=name, patroni_urls=[dead, url], backup_from=backup_from),
                      ScaledClock(SLOT, origin, 60.0), ran, job_seconds=0.5) for name in ("node1", "node2", "node3")]
        seed_state(open_storage(nodes[0].policy.repository), created=SLOT - timedelta(hours=1))
        threads = [threading.Thread(target=lambda n=n: n.scheduler().run_due(threading.Event(), wait=True))
                   for n in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert ran == [expected], f"{scenario}: backups taken by {ran}"
    assert patroni.requests == 1, "the choice is made once per slot and recorded"
    state = StateStore(open_storage(nodes[0].policy.repository), CLUSTER).read()
    assert state is not None
    record = state.jobs["backup"]
    assert (record.status, record.member, record.slot) == ("ok", expected, SLOT)
    assert record.reason.startswith(reason), record.reason
    for node in nodes:
        results = [(e.job, e.result) for e in node.events]
        if node.name == expected:
            assert results == [("backup", "ok")]
        else:  # skipped, or (having seen the choice in the state) never due for it at all
            assert results in ([("backup", "skipped")], []), f"{node.name}: {node.events}"
            assert all(expected in e.detail for e in node.events)


# ---- a real `pgvault schedule run` ------------------------------------------------------------------------

def as_db_user_popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Run cmd as the postgres user directly (runuser would stand between the test and its signals)."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                      env={**os.environ, "HOME": user.pw_dir, "USER": "postgres", "LOGNAME": "postgres"})
    return subprocess.Popen(cmd, cwd="/tmp", text=True, start_new_session=True, **kwargs)


def listed(config: Path) -> list[dict[str, Any]]:
    result = run_pgvault("-q", "list", "--json", config=config)
    assert result.returncode == 0, result.out
    return list(json.loads(result.stdout)["backups"])


def test_sigterm_mid_backup_exits_0_frees_the_locks_and_the_next_start_runs_it(cluster: Cluster) -> None:
    config = cluster.workdir / "scheduler.yaml"
    metrics = f"127.0.0.1:{free_port()}"
    write_policy(config, CLUSTER, cluster.pg.conninfo(), cluster.repo, backup={"part_size": "1MiB"},
                 schedule={"metrics_listen": metrics})
    policy = load_policy(config)
    storage = open_storage(policy.repository)
    now = datetime.now(UTC)
    # The scheduler ran three days ago and was then down: the backup slot is owed; verify and drill
    # are settled, so the backup is the only job.
    slot = latest_slot(policy.schedule.backup, now, UTC_ZONE)
    seed_state(storage, now - timedelta(days=3), {name: latest_slot(getattr(policy.schedule, name), now, UTC_ZONE)
                                                   for name in ("verify", "drill")})
    if cluster.repo.kind == "file":
        chown_to_db_user(Path(policy.repository.path))
    cluster.commit_batch(200)
    layout = Layout(CLUSTER)
    with archiving_blocked(cluster):
        proc = as_db_user_popen([PGVAULT, "--config", str(config), "schedule", "run"], stderr=subprocess.PIPE)
        try:
            def waiting_for_wal() -> bool:
                assert proc.poll() is None, proc.communicate()
                parts = [k for k in cluster.repo.keys(layout.backups_prefix) if "/part-" in k]
                streaming = int(cluster.sql("SELECT count(*) FROM pg_stat_activity "
                                            "WHERE application_name LIKE 'pgvault-backup-%'"))
                return bool(parts) and streaming == 0

            wait_for(waiting_for_wal, "the scheduled backup to stream its parts and wait for its WAL")
            # The daemon serves metrics beside its jobs.
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30) as answer:
                assert answer.status == 200 and b"pgvault_" in answer.read()
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    assert proc.returncode == 0, err
    assert "SIGTERM: abandoning backup" in err
    assert "backup interrupted" in err and "stopped by a signal; abandoned" in err
    assert "Traceback" not in err
    with pytest.raises(OSError):  # the metrics endpoint went with the daemon
        urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5)
    # Both locks are free at once: the scheduler's and the backup's own.
    assert lock_is_free(policy, storage, "scheduler") and lock_is_free(policy, storage, "backup")
    assert listed(config) == []  # the abandoned backup is debris, not a backup
    record = StateStore(storage, CLUSTER).read().jobs["backup"]  # type: ignore[union-attr]
    assert (record.status, record.slot) == ("interrupted", slot)

    # The next start owes that slot and runs it (then expire) — once.
    again = run_pgvault("schedule", "run", "--once", config=config)
    assert again.returncode == 0, again.out
    backups = listed(config)
    assert len(backups) == 1
    assert backups[0]["annotations"]["scheduled"] == slot.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "backup ok" in again.stderr and "expire ok" in again.stderr
    state = StateStore(storage, CLUSTER).read()
    assert state is not None and (state.jobs["backup"].status, state.jobs["expire"].status) == ("ok", "ok")
    assert run_pgvault("schedule", "run", "--once", config=config).returncode == 0
    assert len(listed(config)) == 1  # nothing owed any more


def test_schedule_run_refuses_a_repository_init_never_bound_and_a_bad_patroni_url(workdir: Path) -> None:
    config = workdir / "empty.yaml"
    repo = new_repo(workdir, "file", "empty")
    write_policy(config, CLUSTER, "host=127.0.0.1 port=1", repo, schedule=QUIET)
    result = run_pgvault("schedule", "run", config=config, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "error: cluster 'test' is not initialized in this repository"
    assert repo.keys() == []  # nothing written
    write_policy(config, CLUSTER, "host=127.0.0.1 port=1", repo, schedule={**QUIET, "patroni_urls": ["node1:8008"]})
    result = run_pgvault("schedule", "run", config=config, timeout=60)
    assert result.returncode == 2
    assert "schedule.patroni_urls: 'node1:8008' is not the URL of a Patroni REST API" in result.stderr
    assert "Traceback" not in result.out



@dataclass
class Webhook:
    """A webhook receiver on 127.0.0.1 that keeps what it is sent."""

    posts: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                hook.posts.append({"path": self.path, "body": self.rfile.read(length).decode()})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def bind_without_server(storage: Storage) -> None:
    """Write cluster.json as `init` would, for tests whose server is down or absent."""
    from pgvault.catalog import Catalog, ClusterInfo

    Catalog(storage, CLUSTER).write_cluster_info(ClusterInfo(
        cluster=CLUSTER, system_id="7000000000000000001", pg_version=150004, wal_segment_size=16 * 1024 * 1024,
        created=datetime.now(UTC)))


def test_an_idle_daemon_stops_at_once_on_sigterm_with_exit_0(workdir: Path) -> None:
    repo = new_repo(workdir, "file", "idle")
    config = workdir / "idle.yaml"
    write_policy(config, CLUSTER, "host=127.0.0.1 port=1", repo, schedule=QUIET)
    bind_without_server(open_storage(load_policy(config).repository))
    chown_to_db_user(repo.path)  # type: ignore[attr-defined]
    proc = as_db_user_popen([PGVAULT, "--config", str(config), "schedule", "run"], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: repo.exists(f"{CLUSTER}/scheduler/state.json"), "the scheduler to start")
        time.sleep(0.5)  # asleep until the next slot
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 5
    assert "SIGTERM: stopping" in err and err.rstrip().endswith("scheduler stopped")


def test_once_retries_a_failing_backup_alerts_once_without_secrets_and_exits_1(workdir: Path) -> None:
    repo = new_repo(workdir, "file", "failing")
    config = workdir / "failing.yaml"
    hook = Webhook()
    with hook.serving() as url:
        # The server is down: every attempt fails to connect.
        conninfo = f"host=127.0.0.1 port={free_port()} user=backup password=SeCrEt-77 connect_timeout=2"
        write_policy(config, CLUSTER, conninfo, repo, schedule={**QUIET, "retries": 1, "retry_delay": "1s"},
                     alerts={"webhook_url": f"{url}/hook/tok-SeCrEt-88", "retries": 0})
        policy = load_policy(config)
        storage = open_storage(policy.repository)
        bind_without_server(storage)
        now = datetime.now(UTC)
        seed_state(storage, now - timedelta(days=2), {name: latest_slot(getattr(policy.schedule, name), now, UTC_ZONE)
                                                       for name in ("verify", "drill")})
        chown_to_db_user(repo.path)  # type: ignore[attr-defined]
        result = run_pgvault("schedule", "run", "--once", config=config, timeout=120)
    assert result.returncode == 1, result.out
    lines = result.stderr.splitlines()
    assert lines[-2:] == ["error: backup failed (see the lines above)",
                          "hint: pgvault schedule show tells the last result of each job"]
    assert sum("backup attempt" in line and "failed" in line for line in lines) == 2
    assert any("backup runs again in 1 s" in line for line in lines)
    assert any(" backup failed " in line for line in lines)
    assert len(hook.posts) == 1, hook.posts  # once, after the retries, not per attempt
    alert = json.loads(hook.posts[0]["body"])
    assert (alert["job"], alert["status"], alert["cluster"]) == ("backup", "failed", CLUSTER)
    assert alert["message"].startswith("backup of cluster test failed after 2 attempt(s)")
    assert alert["details"]["attempts"] == 2
    for secret in ("SeCrEt-77", "SeCrEt-88"):
        assert secret not in result.out and secret not in hook.posts[0]["body"]
        assert secret not in json.dumps(StateStore(storage, CLUSTER).read().model_dump(mode="json"))  # type: ignore[union-attr]
