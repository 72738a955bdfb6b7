"""The scheduler on an injected clock: days of schedule run in milliseconds, with fake jobs.

Everything but the jobs and the clock is real: a file repository holds the state, the lock is the
repository's flock. The Patroni choice is a plain function here (tests/integration/test_scheduler.py
asks a real HTTP server).
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvault.cli import cli
from pgvault.config import Policy, parse_policy
from pgvault.errors import PostgresError
from pgvault.ha.patroni import Choice, Member, PatroniError, choose_backup_member, parse_cluster
from pgvault.repo import job_lock
from pgvault.repo.file import FileStorage
from pgvault.scheduler import (
    FakeClock,
    Job,
    JobEvent,
    JobOutcome,
    JobRun,
    Scheduler,
    StateStore,
    build_scheduler,
    cron_table,
    latest_slot,
    next_slot,
    policy_jobs,
    state_key,
    stop_on_signals,
)

CLUSTER = "test"
UTC_ZONE = ZoneInfo("UTC")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def make_policy(repo: Path, **schedule: Any) -> Policy:
    schedule.setdefault("metrics_listen", "")
    return parse_policy({"cluster": CLUSTER, "postgres": {"conninfo": "host=127.0.0.1"},
                         "repository": {"url": f"file://{repo}"}, "schedule": schedule}, "test")


@dataclass
class Ran:
    job: str
    slot: datetime
    clock: datetime  # the (fake) time the job started
    attempt: int
    member: str


@dataclass
class Jobs:
    """Fake jobs that record each run; a script of outcomes per job (default: success)."""

    clock: FakeClock
    ran: list[Ran] = field(default_factory=list)
    scripts: dict[str, list[Any]] = field(default_factory=dict)
    during: dict[str, Callable[[], None]] = field(default_factory=dict)

    def fn(self, name: str) -> Callable[[JobRun], JobOutcome]:
        def run(job_run: JobRun) -> JobOutcome:
            self.ran.append(Ran(name, job_run.slot, self.clock.now(), job_run.attempt, job_run.member))
            if name in self.during:
                self.during[name]()
            script = self.scripts.get(name) or []
            outcome = script.pop(0) if script else JobOutcome(True, f"{name} done")
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return run

    def standard(self, policy: Policy) -> list[Job]:
        s = policy.schedule
        return [Job("backup", self.fn("backup"), cron=s.backup, ha=True),
                Job("expire", self.fn("expire"), follows="backup", on_stop="finish"),
                Job("verify", self.fn("verify"), cron=s.verify),
                Job("drill", self.fn("drill"), cron=s.drill)]

    def of(self, job: str) -> list[Ran]:
        return [r for r in self.ran if r.job == job]


@dataclass
class Rig:
    repo: Path
    storage: FileStorage
    clock: FakeClock
    jobs: Jobs
    events: list[JobEvent] = field(default_factory=list)
    failures: list[JobEvent] = field(default_factory=list)
    recoveries: list[JobEvent] = field(default_factory=list)

    def scheduler(self, policy: Policy | None = None, *, choose: Callable[[], Choice] | None = None,
                  member: str | None = None, **schedule: Any) -> Scheduler:
        policy = policy or make_policy(self.repo, **schedule)
        made = build_scheduler(policy, self.storage, jobs=self.jobs.standard(policy), clock=self.clock)
        made.choose = choose
        if member:
            made.member = member
        made.on_result.append(self.events.append)
        made.on_failure.append(self.failures.append)
        made.on_recovery.append(self.recoveries.append)
        return made

    def state(self) -> dict[str, Any]:
        return json.loads((self.repo / state_key(CLUSTER)).read_text())

    def lock(self) -> Any:
        return job_lock(make_policy(self.repo).repository, self.storage, CLUSTER, "scheduler")


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    clock = FakeClock(at("2026-01-01T00:00:00"))
    return Rig(tmp_path / "repo", FileStorage(tmp_path / "repo"), clock, Jobs(clock))


def run_until(scheduler: Scheduler, clock: FakeClock, end: datetime) -> None:
    clock.end = end
    try:
        scheduler.run(threading.Event())
    finally:
        clock.end = None


# ---- slots ---------------------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
CRONS = ["0 2 * * *", "30 2 * * *", "*/20 * * * *", "0 * * * *", "15 3 * * 0", "0 4 1 */3 *", "59 23 31 12 *"]


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
       cron=st.sampled_from(CRONS), zone=st.sampled_from(ZONES))
def test_latest_slot_is_at_or_before_the_moment_and_the_next_one_after_it(moment: datetime, cron: str,
                                                                         zone: str) -> None:
    tz = ZoneInfo(zone)
    slot = latest_slot(cron, moment, tz)
    following = next_slot(cron, slot, tz)
    assert slot <= moment < following
    assert next_slot(cron, moment, tz) == following
    assert latest_slot(cron, following, tz) == following
    # A slot is a time the cron expression names, on the zone's wall clock.
    assert croniter.match(cron, slot.astimezone(tz).replace(tzinfo=None)) or _in_dst_gap(slot, tz)


def _in_dst_gap(slot: datetime, tz: ZoneInfo) -> bool:
    """A wall time skipped by a DST jump runs just after it, like cron does."""
    before = (slot - timedelta(hours=3)).astimezone(tz).utcoffset()
    return before != slot.astimezone(tz).utcoffset()


@pytest.mark.parametrize(("start", "expected"), [
    # DST starts: 02:30 does not exist on 29 March; the job runs once, after the jump.
    ("2026-03-27T12:00:00", ["2026-03-28T01:30:00", "2026-03-29T01:30:00", "2026-03-30T00:30:00"]),
    # DST ends: 02:30 happens twice on 25 October; the job runs once, at the first.
    ("2026-10-23T12:00:00", ["2026-10-24T00:30:00", "2026-10-25T00:30:00", "2026-10-26T01:30:00"]),
])
def test_daily_job_runs_once_a_day_across_daylight_saving_changes(start: str, expected: list[str]) -> None:
    tz = ZoneInfo("Europe/Berlin")
    slots, moment = [], at(start)
    for _ in expected:
        moment = next_slot("30 2 * * *", moment, tz)
        slots.append(moment)
    assert slots == [at(e) for e in expected]


# ---- the loop ------------------------------------------------------------------------------------------

def test_jobs_fire_on_their_cron_slots_and_expire_follows_each_backup(rig: Rig) -> None:
    scheduler = rig.scheduler()
    run_until(scheduler, rig.clock, at("2026-01-04T00:00:00"))
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert [(r.slot, r.clock) for r in rig.jobs.of("backup")] == [(at(f"{d}T02:00:00"),) * 2 for d in days]
    assert [r.clock for r in rig.jobs.of("expire")] == [at(f"{d}T02:00:00") for d in days]
    assert [r.clock for r in rig.jobs.of("verify")] == [at(f"{d}T03:30:00") for d in days]
    # "0 4 1 */3 *": the first of January, April, July, October.
    assert [r.clock for r in rig.jobs.of("drill")] == [at("2026-01-01T04:00:00")]
    # Each backup is followed by its expire before anything else runs.
    order = [r.job for r in rig.jobs.ran]
    assert order[:4] == ["backup", "expire", "verify", "drill"]
    assert [e.result for e in rig.events] == ["ok"] * len(rig.events)
    state = rig.state()
    assert state["jobs"]["backup"]["slot"] == "2026-01-03T02:00:00Z"
    assert state["jobs"]["backup"]["status"] == "ok"
    assert state["jobs"]["expire"]["slot"] == "2026-01-03T02:00:00Z"


def test_cron_expressions_are_read_in_the_schedule_time_zone(rig: Rig) -> None:
    scheduler = rig.scheduler(timezone="Europe/Berlin", backup="0 2 * * *", verify="0 3 * * *")
    run_until(scheduler, rig.clock, at("2026-01-02T12:00:00"))
    # 02:00 in Berlin is 01:00 UTC in winter.
    assert [r.clock for r in rig.jobs.of("backup")] == [at("2026-01-01T01:00:00"), at("2026-01-02T01:00:00")]


def test_first_start_owes_nothing_from_before_it(rig: Rig) -> None:
    rig.clock.current = at("2026-01-01T12:00:00")
    assert rig.scheduler().run_due(threading.Event(), wait=True) == []
    assert rig.jobs.ran == []
    assert rig.state()["created"] == "2026-01-01T12:00:00Z"


def test_runs_missed_while_down_run_once_at_start_up(rig: Rig) -> None:
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T12:00:00"))  # ran once, then the machine was off
    assert len(rig.jobs.of("backup")) == 1
    rig.jobs.ran.clear()

    rig.clock.current = at("2026-01-04T08:00:00")  # three 02:00 slots and three 03:30 slots missed
    restarted = rig.scheduler()
    restarted.run_due(threading.Event(), wait=True)
    assert [(r.job, r.slot, r.clock) for r in rig.jobs.ran] == [
        ("backup", at("2026-01-04T02:00:00"), at("2026-01-04T08:00:00")),  # the latest missed slot, once
        ("expire", at("2026-01-04T02:00:00"), at("2026-01-04T08:00:00")),
        ("verify", at("2026-01-04T03:30:00"), at("2026-01-04T08:00:00")),
    ]
    rig.jobs.ran.clear()
    run_until(restarted, rig.clock, at("2026-01-05T12:00:00"))  # and then on schedule again
    assert [(r.job, r.clock) for r in rig.jobs.ran] == [
        ("backup", at("2026-01-05T02:00:00")), ("expire", at("2026-01-05T02:00:00")),
        ("verify", at("2026-01-05T03:30:00"))]


def test_a_missed_run_is_owed_by_the_state_in_the_repository_not_by_one_process(rig: Rig) -> None:
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T12:00:00"))
    rig.clock.current = at("2026-01-02T09:00:00")
    plans = {p.job: p for p in rig.scheduler().plan()}  # what `schedule show` tells
    assert plans["backup"].missed == at("2026-01-02T02:00:00")
    assert plans["backup"].next_run == at("2026-01-03T02:00:00")
    assert plans["backup"].last is not None and plans["backup"].last.status == "ok"
    assert plans["drill"].missed is None
    rig.scheduler().run_due(threading.Event(), wait=True)
    assert len(rig.jobs.of("backup")) == 2
    assert rig.scheduler().run_due(threading.Event(), wait=True) == []  # a second process owes nothing more
    assert len(rig.jobs.of("backup")) == 2


# ---- failures, retries, alerts -------------------------------------------------------------------------

def test_a_failed_job_is_retried_after_retry_delay_and_succeeds_without_alert(rig: Rig) -> None:
    rig.jobs.scripts["backup"] = [PostgresError("server closed the connection"), JobOutcome(False, "no"),
                                  JobOutcome(True, "third time")]
    run_until(rig.scheduler(retries=2, retry_delay="5m"), rig.clock, at("2026-01-01T03:00:00"))
    assert [(r.attempt, r.clock) for r in rig.jobs.of("backup")] == [
        (1, at("2026-01-01T02:00:00")), (2, at("2026-01-01T02:05:00")), (3, at("2026-01-01T02:10:00"))]
    assert len(rig.jobs.of("expire")) == 1
    assert rig.failures == [] and rig.recoveries == []
    backup = rig.state()["jobs"]["backup"]
    assert (backup["status"], backup["attempts"], backup["detail"]) == ("ok", 3, "third time")


def test_a_job_failing_every_retry_alerts_once_and_its_next_success_is_a_recovery(rig: Rig) -> None:
    rig.jobs.scripts["backup"] = [PostgresError("password=SeCrEt refused"), ValueError("bug"),
                                  JobOutcome(False, "still down")]
    run_until(rig.scheduler(retries=2, retry_delay="1m"), rig.clock, at("2026-01-01T12:00:00"))
    assert len(rig.jobs.of("backup")) == 3
    assert rig.jobs.of("expire") == []  # nothing to expire after a failed backup
    assert [(e.job, e.result, e.attempts, e.detail) for e in rig.failures] == [("backup", "failed", 3, "still down")]
    state = rig.state()["jobs"]["backup"]
    assert (state["status"], state["failing"]) == ("failed", True)
    assert "SeCrEt" not in json.dumps(rig.state())
    run_until(rig.scheduler(retries=2, retry_delay="1m"), rig.clock, at("2026-01-02T12:00:00"))
    assert [(e.job, e.result, e.recovered) for e in rig.recoveries] == [("backup", "ok", True)]
    assert len(rig.failures) == 1


def test_expire_failing_is_retried_on_its_own_without_another_backup(rig: Rig) -> None:
    rig.jobs.scripts["expire"] = [JobOutcome(False, "cannot delete"), JobOutcome(True, "expired 2")]
    run_until(rig.scheduler(retries=1, retry_delay="1m"), rig.clock, at("2026-01-01T03:00:00"))
    assert len(rig.jobs.of("backup")) == 1
    assert [r.clock for r in rig.jobs.of("expire")] == [at("2026-01-01T02:00:00"), at("2026-01-01T02:01:00")]
    assert rig.state()["jobs"]["expire"]["status"] == "ok"


def test_a_listener_that_raises_does_not_stop_the_schedule(rig: Rig) -> None:
    scheduler = rig.scheduler()

    def broken(_event: JobEvent) -> None:
        raise RuntimeError("webhook down")

    scheduler.on_result.insert(0, broken)
    run_until(scheduler, rig.clock, at("2026-01-02T12:00:00"))
    assert len(rig.jobs.of("backup")) == 2


def test_verify_and_drill_reports_that_are_not_ok_are_job_failures(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pgvault import drill, expire, verify

    policy = make_policy(tmp_path / "repo")
    storage = FileStorage(tmp_path / "repo")
    started = at("2026-01-01T03:30:00")
    verify_reports = iter([
        verify.VerifyReport(id="v1", cluster=CLUSTER, repository="file:///r", started=started, deep=False,
                            backup_id=None, problems=[verify.Problem("test/wal/x", "checksum", "does not match")]),
        verify.VerifyReport(id="v2", cluster=CLUSTER, repository="file:///r", started=started, deep=False,
                            backup_id=None, checked={"backups": 2})])
    drill_reports = iter([
        drill.DrillReport(id="d1", cluster=CLUSTER, started_at=started, target_time=None, target="latest",
                          failures=["check rows: expected 5, got 4"], cleaned_up=True),
        drill.DrillReport(id="d2", cluster=CLUSTER, started_at=started, target_time=None, target="latest",
                          cleaned_up=True, rto_seconds=42.4, rpo_seconds=3.0)])
    calls: list[tuple[str, Policy, Any, dict[str, Any]]] = []

    def fake(name: str, results: Iterator[Any]) -> Callable[..., Any]:
        def run(p: Policy, s: Any, **kwargs: Any) -> Any:
            calls.append((name, p, s, kwargs))
            return next(results)
        return run

    summary = types.SimpleNamespace(as_dict=lambda: {"summary": "kept 3 backups, deleted 1"})
    monkeypatch.setattr(verify, "run_verify", fake("verify", verify_reports))
    monkeypatch.setattr(drill, "run_drill", fake("drill", drill_reports))
    monkeypatch.setattr(expire, "run_expire", fake("expire", iter([summary])))
    jobs = {j.name: j for j in policy_jobs(policy, storage)}

    def run(name: str) -> JobOutcome:
        return jobs[name].run(JobRun(name, started, 1, "node1", lambda _m: None))

    assert run("verify") == JobOutcome(False, "report v1: 1 problem(s): test/wal/x: does not match")
    assert run("verify") == JobOutcome(True, "report v2: no problems (2 backups)")
    assert run("drill") == JobOutcome(False, "report d1: check rows: expected 5, got 4")
    assert run("drill") == JobOutcome(True, "report d2, RTO 42s, RPO 3s")
    assert run("expire") == JobOutcome(True, "kept 3 backups, deleted 1")
    assert [(name, p, s) for name, p, s, _ in calls] == [
        ("verify", policy, storage), ("verify", policy, storage), ("drill", policy, storage),
        ("drill", policy, storage), ("expire", policy, storage)]
    assert calls[-1][3]["now"].tzinfo is not None  # retention is planned for the real, aware now
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the drill's signal handling was undone


def test_the_policy_jobs_are_backup_expire_verify_drill_and_only_backup_follows_patroni(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, backup="0 1 * * *", verify="0 5 * * 1", drill="0 6 1 * *")
    jobs = policy_jobs(policy, FileStorage(tmp_path))
    assert [(j.name, j.cron, j.follows, j.ha, j.on_stop) for j in jobs] == [
        ("backup", "0 1 * * *", None, True, "abandon"), ("expire", None, "backup", False, "finish"),
        ("verify", "0 5 * * 1", None, False, "abandon"), ("drill", "0 6 1 * *", None, False, "abandon")]


# ---- one job at a time; dead runs ----------------------------------------------------------------------

def test_a_held_lock_leaves_the_slot_to_its_holder_with_once_and_is_waited_for_otherwise(rig: Rig) -> None:
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T12:00:00"))
    rig.jobs.ran.clear()
    rig.clock.current = at("2026-01-02T02:00:00")
    with rig.lock():  # another process runs a job
        events = rig.scheduler().run_due(threading.Event(), wait=False)
        assert [(e.job, e.result) for e in events] == [("backup", "busy")]
        assert "another scheduler of cluster 'test' is running" in events[0].detail
        assert rig.jobs.ran == []
        # Waiting: the lock stays taken until the next slot, so this slot is given up.
        waiting = rig.scheduler()
        waiting.lock_poll = timedelta(minutes=30)
        events = waiting.run_due(threading.Event(), wait=True)
        assert (events[0].job, events[0].result) == ("backup", "skipped")
        assert "stayed taken until the next slot" in events[0].detail
        assert rig.jobs.ran == []
    rig.clock.current = at("2026-01-02T02:30:00")
    rig.scheduler().run_due(threading.Event(), wait=False)  # released: the slot is owed and runs
    assert [r.job for r in rig.jobs.ran] == ["backup", "expire"]


def test_a_run_whose_process_died_runs_again_and_counts_as_an_attempt(rig: Rig) -> None:
    def die() -> None:
        raise SystemExit("killed")  # stands for SIGKILL: no state written after "running"

    rig.jobs.during["backup"] = die
    with pytest.raises(SystemExit):
        run_until(rig.scheduler(), rig.clock, at("2026-01-01T12:00:00"))
    assert rig.state()["jobs"]["backup"]["status"] == "running"
    rig.clock.current = at("2026-01-01T02:30:00")
    rig.jobs.during.clear()
    rig.scheduler().run_due(threading.Event(), wait=True)
    assert [(r.job, r.slot, r.attempt) for r in rig.jobs.ran[1:]] == [
        ("backup", at("2026-01-01T02:00:00"), 2), ("expire", at("2026-01-01T02:00:00"), 1)]


def test_a_job_that_kills_its_process_every_time_is_not_run_forever(rig: Rig) -> None:
    def die() -> None:
        raise SystemExit("killed")

    rig.jobs.during["backup"] = die
    for _ in range(3):  # retries=2: three attempts, each one ending its process
        with pytest.raises(SystemExit):
            run_until(rig.scheduler(retries=2), rig.clock, at("2026-01-01T12:00:00"))
    assert [r.attempt for r in rig.jobs.ran] == [1, 2, 3]
    rig.scheduler(retries=2).run_due(threading.Event(), wait=True)
    assert len(rig.jobs.ran) == 3
    assert [(e.job, e.result) for e in rig.failures] == [("backup", "failed")]
    assert "stopped during each of 3 attempt(s)" in rig.state()["jobs"]["backup"]["detail"]


# ---- signals -------------------------------------------------------------------------------------------

def test_sigterm_abandons_a_running_backup_releases_the_lock_and_the_slot_runs_at_the_next_start(rig: Rig) -> None:
    abandoned = []

    def signalled_mid_job() -> None:
        try:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(30)  # the handler raises in here, at the latest
        except BaseException:
            abandoned.append(True)
            raise

    rig.jobs.during["backup"] = signalled_mid_job
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T01:00:00"))  # first start
    scheduler = rig.scheduler()
    stop = threading.Event()
    rig.clock.current = at("2026-01-01T02:00:00")
    started = time.monotonic()
    with stop_on_signals(scheduler, stop):
        scheduler.run(stop)
    assert time.monotonic() - started < 5
    assert abandoned == [True] and stop.is_set()
    assert [r.job for r in rig.jobs.ran] == ["backup"]  # nothing ran after the signal
    assert [(e.job, e.result) for e in rig.events] == [("backup", "interrupted")]
    assert rig.state()["jobs"]["backup"]["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    with rig.lock():
        pass  # released
    rig.jobs.during.clear()
    rig.scheduler().run_due(threading.Event(), wait=True)  # the next start runs it again, from attempt 1
    assert [(r.job, r.slot, r.attempt) for r in rig.jobs.ran[1:]] == [
        ("backup", at("2026-01-01T02:00:00"), 1), ("expire", at("2026-01-01T02:00:00"), 1)]


def test_sigterm_lets_expire_finish_and_a_second_signal_abandons_it(rig: Rig) -> None:
    finished = []

    def one_signal() -> None:
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.05)
        finished.append(True)

    rig.jobs.during["expire"] = one_signal
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T01:00:00"))
    scheduler = rig.scheduler()
    stop = threading.Event()
    rig.clock.current = at("2026-01-01T02:00:00")
    with stop_on_signals(scheduler, stop):
        scheduler.run(stop)
    assert finished == [True]
    assert [(e.job, e.result) for e in rig.events] == [("backup", "ok"), ("expire", "ok")]
    assert [r.job for r in rig.jobs.ran] == ["backup", "expire"]  # verify (03:30) never started

    def two_signals() -> None:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        time.sleep(30)

    rig.jobs.during["expire"] = two_signals
    rig.events.clear()
    scheduler, stop = rig.scheduler(), threading.Event()
    rig.clock.current = at("2026-01-02T02:00:00")
    with stop_on_signals(scheduler, stop):
        scheduler.run(stop)
    assert [(e.job, e.result) for e in rig.events] == [("backup", "ok"), ("expire", "interrupted")]


def test_a_job_that_turns_the_signal_into_ctrl_c_itself_also_stops_the_scheduler_cleanly(rig: Rig) -> None:
    def own_signal_handling() -> None:
        raise KeyboardInterrupt  # what the drill raises once its scratch instance is removed

    rig.jobs.during["verify"] = own_signal_handling
    run_until(rig.scheduler(), rig.clock, at("2026-01-03T00:00:00"))
    assert [(e.job, e.result) for e in rig.events] == [("backup", "ok"), ("expire", "ok"), ("verify", "interrupted")]
    assert rig.clock.now() == at("2026-01-01T03:30:00")  # the loop ended there: drill (04:00) never started
    assert rig.state()["jobs"]["verify"]["status"] == "interrupted"
    with rig.lock():
        pass


# ---- HA ------------------------------------------------------------------------------------------------

def test_the_first_node_records_the_choice_and_every_node_follows_it(rig: Rig) -> None:
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T01:00:00"))
    rig.clock.current = at("2026-01-01T02:00:00")
    asked = []

    def patroni(says: str) -> Callable[[], Choice]:
        def choose() -> Choice:
            asked.append(says)
            return Choice(says, f"{says} is a healthy replica")
        return choose

    # node1 handles the slot first and Patroni says node2; node3 would have heard node3 a moment later.
    node1 = rig.scheduler(member="node1", choose=patroni("node2"))
    node2 = rig.scheduler(member="node2", choose=patroni("node3"))
    node3 = rig.scheduler(member="node3", choose=patroni("node3"))
    events = {node.member: [(e.job, e.result) for e in node.run_due(threading.Event(), wait=True)]
              for node in (node1, node3, node2)}
    # node3 finds the slot assigned to node2 and owes it nothing; node2 finds it owed to itself.
    assert events == {"node1": [("backup", "skipped")], "node3": [], "node2": [("backup", "ok"), ("expire", "ok")]}
    assert asked == ["node2"]  # decided once, then read from the state
    assert [(r.job, r.member) for r in rig.jobs.ran if r.job in ("backup", "expire")] == [
        ("backup", "node2"), ("expire", "node2")]
    assert rig.state()["jobs"]["backup"]["reason"] == "node2 is a healthy replica"
    # verify is not HA-filtered: the first node to reach it ran it, the others found it done.
    assert [r.member for r in rig.jobs.of("verify")] == []  # 03:30 not reached yet
    rig.clock.current = at("2026-01-01T03:30:00")
    for node in (node3, node1, node2):
        node.run_due(threading.Event(), wait=True)
    assert [r.member for r in rig.jobs.of("verify")] == ["node3"]


def test_a_slot_its_chosen_node_never_runs_is_reported_when_the_next_slot_comes(rig: Rig) -> None:
    def node2() -> Choice:
        return Choice("node2", "node2 is a healthy replica")

    run_until(rig.scheduler(), rig.clock, at("2026-01-01T01:00:00"))
    # node2's scheduler is not running (or runs under another name): nobody takes node2's slots.
    run_until(rig.scheduler(member="node1", choose=node2), rig.clock, at("2026-01-03T01:00:00"))
    assert rig.jobs.of("backup") == []
    assert [(e.slot, e.member) for e in rig.failures] == [(at("2026-01-01T02:00:00"), "node2")]
    assert "assigned to node2, whose scheduler never started it" in rig.failures[0].detail
    record = rig.state()["jobs"]["backup"]
    assert (record["slot"], record["status"], record["member"]) == ("2026-01-02T02:00:00Z", "pending", "node2")
    # node2 comes back: it runs its owed slot, and that success is a recovery.
    rig.scheduler(member="node2", choose=node2).run_due(threading.Event(), wait=True)
    assert [(r.member, r.slot) for r in rig.jobs.of("backup")] == [("node2", at("2026-01-02T02:00:00"))]
    assert [(e.job, e.member) for e in rig.recoveries] == [("backup", "node2")]


def test_when_patroni_cannot_be_read_the_backup_fails_after_retries_and_alerts(rig: Rig) -> None:
    def unreachable() -> Choice:
        raise PatroniError("cannot read the cluster from Patroni's REST API: connection refused")

    run_until(rig.scheduler(), rig.clock, at("2026-01-01T01:00:00"))
    run_until(rig.scheduler(choose=unreachable, retries=1, retry_delay="2m"), rig.clock, at("2026-01-01T02:30:00"))
    assert rig.jobs.of("backup") == []
    assert [(e.job, e.attempts) for e in rig.failures] == [("backup", 2)]
    assert "connection refused" in rig.failures[0].detail


PATRONI_4 = {"members": [
    {"name": "node1", "role": "leader", "state": "running", "api_url": "http://10.0.0.1:8008/patroni",
     "host": "10.0.0.1", "port": 5432, "timeline": 3},
    {"name": "node2", "role": "replica", "state": "streaming", "api_url": "http://10.0.0.2:8008/patroni",
     "timeline": 3, "receive_lag": 0, "replay_lag": 0, "lag": 0, "lsn": "0/5000060"},
    {"name": "node3", "role": "sync_standby", "state": "streaming", "lag": 1024, "tags": {"nofailover": True}},
    {"name": "node4", "role": "replica", "state": "running", "lag": "unknown"}],
    "scope": "demo"}


def test_parse_cluster_reads_patroni_answers() -> None:
    members = parse_cluster(PATRONI_4)
    assert [(m.name, m.role, m.state, m.lag) for m in members] == [
        ("node1", "leader", "running", None), ("node2", "replica", "streaming", 0),
        ("node3", "sync_standby", "streaming", 1024), ("node4", "replica", "running", None)]
    assert members[2].tags == {"nofailover": True}
    with pytest.raises(ValueError, match="members"):
        parse_cluster({"scope": "demo"})


MAX_LAG = 16 * 1024 * 1024


def member_lists() -> st.SearchStrategy[list[Member]]:
    one = st.builds(Member, name=st.sampled_from([f"node{i}" for i in range(1, 7)]),
                    role=st.sampled_from(["leader", "replica", "sync_standby", "standby_leader", "replica"]),
                    state=st.sampled_from(["running", "streaming", "stopped", "starting", "in archive recovery"]),
                    lag=st.one_of(st.none(), st.integers(0, 2 * MAX_LAG)))
    return st.lists(one, max_size=6, unique_by=lambda m: m.name)


@settings(max_examples=300)
@given(members=member_lists(), prefer=st.sampled_from(["leader", "replica"]), data=st.data())
def test_the_choice_is_the_same_in_any_order_and_always_a_healthy_member(members: list[Member], prefer: Any,
                                                                        data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(members))
    try:
        choice = choose_backup_member(members, prefer, MAX_LAG)
    except PatroniError:
        with pytest.raises(PatroniError):
            choose_backup_member(shuffled, prefer, MAX_LAG)
        assert not any(m.is_leader and m.state == "running" for m in members)
        return
    assert choose_backup_member(shuffled, prefer, MAX_LAG) == choice
    chosen = next(m for m in members if m.name == choice.member)
    healthy = [m for m in members if m.is_replica and m.state in ("running", "streaming")
               and m.lag is not None and m.lag <= MAX_LAG]
    if prefer == "replica" and healthy:
        assert chosen == min(healthy, key=lambda m: m.name)
    else:
        assert chosen.is_leader and chosen.state == "running"


def test_choice_prefers_a_healthy_replica_and_falls_back_to_the_leader() -> None:
    members = parse_cluster(PATRONI_4)
    assert choose_backup_member(members, "replica", MAX_LAG).member == "node2"
    assert choose_backup_member(members, "leader", MAX_LAG).member == "node1"
    lagging = [Member("node1", "leader", "running"), Member("node2", "replica", "streaming", 20 * 1024 * 1024),
               Member("node3", "replica", "stopped", 0)]
    choice = choose_backup_member(lagging, "replica", MAX_LAG)
    assert choice.member == "node1"
    assert "node2 lags 20.0 MiB (more than 16.0 MiB)" in choice.reason and "node3 is stopped" in choice.reason
    with pytest.raises(PatroniError, match="the leader node1 is stopped"):
        choose_backup_member([Member("node1", "leader", "stopped")], "leader", MAX_LAG)


def test_the_default_lag_limit_keeps_a_replica_that_patroni_shows_one_wal_switch_behind() -> None:
    from pgvault.config import ScheduleConfig

    # Patroni's /cluster lag after an archive_timeout switch on an idle cluster, seen in CI: the
    # leader's position had moved to the next segment, the replicas' not yet (loop_wait).
    default = ScheduleConfig().max_replica_lag
    members = [Member("pg1", "leader", "running"), Member("pg2", "replica", "streaming", 16_943_328),
               Member("pg3", "sync_standby", "streaming", 16_943_328)]
    assert choose_backup_member(members, "replica", default).member == "pg2"
    behind = [members[0], Member("pg2", "replica", "streaming", default + 1), members[2]]
    assert choose_backup_member(behind, "replica", default).member == "pg3"


# ---- state, show, cron ---------------------------------------------------------------------------------

def test_a_damaged_state_is_reported_and_the_scheduler_starts_afresh(rig: Rig, caplog: pytest.LogCaptureFixture
                                                                     ) -> None:
    run_until(rig.scheduler(), rig.clock, at("2026-01-01T12:00:00"))
    path = rig.repo / state_key(CLUSTER)
    path.write_text(path.read_text().replace("ok", "ko"))  # no longer matches its recorded SHA-256
    assert StateStore(rig.storage, CLUSTER).read() is None
    assert "unreadable" in caplog.text
    rig.jobs.ran.clear()
    run_until(rig.scheduler(), rig.clock, at("2026-01-02T12:00:00"))
    assert [r.job for r in rig.jobs.ran] == ["backup", "expire", "verify"]


def write_policy_file(tmp_path: Path, **schedule: Any) -> Path:
    import yaml

    path = tmp_path / "policy.yaml"
    data = {"cluster": CLUSTER, "postgres": {"conninfo": "host=127.0.0.1 password=SeCrEt"},
            "repository": {"url": f"file://{tmp_path}/repo"}, "schedule": {"metrics_listen": "", **schedule}}
    path.write_text(yaml.safe_dump(data))
    return path


def test_schedule_show_json_tells_next_runs_and_last_results(rig: Rig, tmp_path: Path) -> None:
    config = write_policy_file(tmp_path, timezone="Europe/Berlin", patroni_urls=["http://127.0.0.1:1/"])
    result = CliRunner().invoke(cli, ["--config", str(config), "schedule", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["cluster"], shown["timezone"], shown["ha"]["backup_from"]) == (CLUSTER, "Europe/Berlin", "replica")
    jobs = {job["job"]: job for job in shown["jobs"]}
    assert list(jobs) == ["backup", "expire", "verify", "drill"]
    assert jobs["expire"] == {"job": "expire", "cron": None, "follows": "backup", "next_run": None, "missed": None,
                              "last": None}
    next_backup = datetime.fromisoformat(jobs["backup"]["next_run"])
    assert next_backup.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M") == "02:00"
    assert timedelta(0) < next_backup - datetime.now(UTC) <= timedelta(days=1)

    # After a run, the last result is there, in text too.
    rig.clock.current = datetime.now(UTC) - timedelta(days=2)
    run_until(rig.scheduler(timezone="Europe/Berlin"), rig.clock, datetime.now(UTC) - timedelta(hours=25))
    shown = json.loads(CliRunner().invoke(cli, ["--config", str(config), "schedule", "show", "--json"]).output)
    last = {job["job"]: job["last"] for job in shown["jobs"]}
    assert last["backup"]["status"] == "ok" and last["backup"]["detail"] == "backup done"
    assert shown["jobs"][0]["missed"] is not None  # yesterday's 02:00 is owed
    text = CliRunner().invoke(cli, ["--config", str(config), "schedule", "show"]).output
    assert "backup  0 2 * * *" in text and "ok on " in text and "now (missed" in text


def test_cron_prints_cron_d_lines_with_absolute_paths(tmp_path: Path) -> None:
    config = write_policy_file(tmp_path, backup="15 1 * * *", verify="0 5 * * 0", drill="0 6 1 1 *")
    result = CliRunner().invoke(cli, ["--config", str(config), "cron"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert lines[:2] == ["SHELL=/bin/sh", "CRON_TZ=UTC"]
    entries = [line.split() for line in lines[2:]]
    assert [e[:5] for e in entries[:3]] == [["15", "1", "*", "*", "*"], ["0", "5", "*", "*", "0"],
                                           ["0", "6", "1", "1", "*"]]
    assert entries[3][0] == "@reboot"
    for entry in entries:
        fields = 1 if entry[0] == "@reboot" else 5
        user, command = entry[fields], shlex.split(" ".join(entry[fields + 1:]))
        assert user == "postgres"
        assert Path(command[0]).is_absolute() and Path(command[0]).name in ("pgvault", "python", "python3")
        assert command[command.index("--config") + 1] == str(config.absolute())
        assert command[-3:] == ["schedule", "run", "--once"]
    assert "SeCrEt" not in result.output
    other = CliRunner().invoke(cli, ["--config", str(config), "cron", "--user", "backup"])
    assert " backup /" in other.stdout
    bad = CliRunner().invoke(cli, ["--config", str(config), "cron", "--user", "a b"])
    assert bad.exit_code != 0


def test_cron_table_escapes_percent_signs(tmp_path: Path) -> None:
    table = cron_table(make_policy(tmp_path), "/etc/pgvault/50%.yaml", ["/usr/bin/pgvault"], "postgres")
    commands = [line for line in table.splitlines() if line.startswith(("@reboot", "0 ", "30 "))]
    assert len(commands) == 4
    assert all("--config /etc/pgvault/50\\%.yaml" in line for line in commands)


def test_bad_patroni_url_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    from pgvault.errors import ConfigError

    with pytest.raises(ConfigError, match=r"schedule\.patroni_urls: '10.0.0.1:8008' is not the URL"):
        make_policy(tmp_path, patroni_urls=["10.0.0.1:8008"])
    with pytest.raises(ConfigError) as raised:
        make_policy(tmp_path, patroni_urls=["ftp://user:pw@host/"])
    assert "pw" not in raised.value.message


@pytest.fixture(autouse=True)
def _default_signals() -> Iterator[None]:
    yield
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_job_switched_off_is_not_run_here_and_expire_goes_with_backup(tmp_path: Path) -> None:
    from pgvault.repo.file import FileStorage

    storage = FileStorage(tmp_path)
    policy = make_policy(tmp_path, drill="OFF", verify="30 3 * * *")
    assert policy.schedule.drill == "off"
    assert [job.name for job in policy_jobs(policy, storage)] == ["backup", "expire", "verify"]
    no_backup = make_policy(tmp_path, backup="off", drill="off")
    assert [job.name for job in policy_jobs(no_backup, storage)] == ["verify"]
    table = cron_table(no_backup, "/etc/pgvault/p.yaml", ["/usr/bin/pgvault"], "postgres")
    assert "# backup, then expire: off on this node" in table and "# drill: off on this node" in table
    assert [line.split(" postgres ")[0] for line in table.splitlines() if " postgres " in line] == [
        "30 3 * * *", "@reboot"]
    from pgvault.errors import ConfigError

    with pytest.raises(ConfigError, match=r"schedule\.drill: 'of' is not a cron expression; .* or off"):
        make_policy(tmp_path, drill="of")
