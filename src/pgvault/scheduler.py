"""The scheduler: the policy's jobs on their cron schedules, one at a time, missed runs once, HA-aware.

Jobs: `backup` (schedule.backup), `expire` after each successful backup, `verify` and `drill`.
Everything the scheduler knows lives in the repository, so it survives restarts and is shared by
every node that runs a scheduler for the cluster:

- `<cluster>/locks/scheduler.lock`: the repository's job lock (`repo.job_lock`: an flock, or a
  lease on S3 that a dead or silent holder loses). A job runs only while its process holds it, so
  one job at a time runs per cluster and repository, across processes and nodes.
- `<cluster>/scheduler/state.json`: per job, the last slot (the cron time a run belongs to) and
  what became of it: who runs it, whether it succeeded, how long it took. Written only under the
  lock. A slot is run at most once; after downtime only the latest missed slot runs, once.

With Patroni (`schedule.patroni_urls`), the node that handles a backup slot first decides, from
Patroni's REST API, which member takes it (`ha/patroni.choose_backup_member`) and records the
choice in the state: every node then agrees, even if they saw Patroni a moment apart. The others
skip the slot (it counts as done for them).

Time comes from a `Clock`, so tests drive days of schedule in milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, ValidationError

from pgvault.config import CRON_OFF
from pgvault.errors import LockedError, ObjectNotFound, PgvaultError
from pgvault.redaction import redact
from pgvault.units import format_size

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from pgvault.config import Policy, ScheduleConfig
    from pgvault.ha.patroni import Choice
    from pgvault.repo.base import Storage

log = logging.getLogger("pgvault.scheduler")
job_log = logging.getLogger("pgvault.scheduler.job")  # what jobs report while they run (-q hides it)

LOCK_JOB = "scheduler"  # repo.job_lock's job name: <cluster>/locks/scheduler.lock
# How often a scheduler waiting for the lock tries again. Short enough that a node waiting behind
# a finished job notices within seconds; each try is one small request.
LOCK_POLL = timedelta(seconds=10)
# After the repository could not be read, wait this long before the next try.
ERROR_BACKOFF = timedelta(seconds=60)


def state_key(cluster: str) -> str:
    """The scheduler's state object (kept beside the other per-cluster areas of the layout)."""
    return f"{cluster}/scheduler/state.json"


# ---- time -------------------------------------------------------------------------------------------

class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, time-zone aware."""
        ...

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        """Wait until `when` or until stop is set; return whether stop is set."""
        ...


class RealClock:
    # Waking at least every minute re-reads the wall clock, so a suspended machine or a stepped
    # clock delays a job by at most a minute.
    MAX_NAP = 60.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        while not stop.is_set():
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                break
            stop.wait(min(remaining, self.MAX_NAP))
        return stop.is_set()


class FakeClock:
    """Time that moves only when the scheduler sleeps (or a test calls advance).

    With `end`, a sleep that would pass it sets stop instead: the daemon loop then returns, so a
    test runs "three days" of schedule and stops.
    """

    def __init__(self, start: datetime, *, end: datetime | None = None) -> None:
        self.current = start
        self.end = end
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self.current

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.current += delta

    def sleep_until(self, when: datetime, stop: threading.Event) -> bool:
        if stop.is_set():
            return True
        if self.end is not None and when > self.end:
            with self._lock:
                self.current = max(self.current, self.end)
            stop.set()
            return True
        with self._lock:
            self.current = max(self.current, when)
        return stop.is_set()


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """A wall-clock time in zone as a UTC instant. A repeated time (DST ending) counts once, at its
    first occurrence; a skipped one (DST starting) maps past the jump, as cron runs it."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def next_slot(cron: str, after: datetime, zone: ZoneInfo) -> datetime:
    """The first slot of cron (read in zone) strictly after `after`, in UTC."""
    from croniter import croniter

    walls = croniter(cron, after.astimezone(zone).replace(tzinfo=None))
    while True:
        at = _instant(walls.get_next(datetime), zone)
        if at > after:
            return at


def latest_slot(cron: str, at: datetime, zone: ZoneInfo) -> datetime:
    """The last slot of cron at or before `at`, in UTC: the slot a run at `at` belongs to."""
    from croniter import croniter

    # croniter's get_prev is strict; a microsecond later includes `at` itself.
    walls = croniter(cron, at.astimezone(zone).replace(tzinfo=None) + timedelta(microseconds=1))
    slot = _instant(walls.get_prev(datetime), zone)
    while slot > at:  # a skipped wall time mapped past `at`
        slot = _instant(walls.get_prev(datetime), zone)
    while (following := next_slot(cron, slot, zone)) <= at:
        slot = following
    return slot


# ---- state ------------------------------------------------------------------------------------------

Status = Literal["pending", "running", "ok", "failed", "interrupted"]
OPEN: tuple[Status, ...] = ("pending", "running", "interrupted")


class JobRecord(BaseModel):
    """The last slot of one job and what became of it."""

    model_config = ConfigDict(extra="ignore")

    slot: datetime
    status: Status  # pending: assigned to member, not started; interrupted: stopped by a signal
    member: str  # the node that runs or ran it
    reason: str = ""  # why that node (the HA choice), for people
    started: datetime | None = None
    finished: datetime | None = None
    duration_s: float | None = None
    attempts: int = 0
    detail: str = ""  # what the job reported, or its error
    last_ok: datetime | None = None  # when a run of this job last succeeded (any slot)
    failing: bool = False  # the last finished slot failed: the next success is a recovery


class SchedulerState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = 1
    created: datetime  # slots before this were never owed (no missed runs from before the first start)
    jobs: dict[str, JobRecord] = {}


class StateStore:
    """state.json in the repository. Written only under the scheduler lock."""

    def __init__(self, storage: Storage, cluster: str) -> None:
        self.storage = storage
        self.key = state_key(cluster)

    def read(self) -> SchedulerState | None:
        from pgvault.errors import IntegrityError
        from pgvault.repo.base import read_verified

        try:
            data, _meta = read_verified(self.storage, self.key)
            return SchedulerState.model_validate_json(data)
        except ObjectNotFound:
            return None
        except (IntegrityError, ValidationError, ValueError) as exc:
            # A damaged state only costs knowledge of past runs; the scheduler must keep scheduling.
            log.warning("scheduler state %s is unreadable (%s); starting afresh", self.key,
                        getattr(exc, "message", type(exc).__name__))
            return None

    def write(self, state: SchedulerState) -> None:
        self.storage.put(self.key, io.BytesIO(state.model_dump_json(indent=2).encode()), overwrite=True)


# ---- jobs -------------------------------------------------------------------------------------------

class JobInterrupted(KeyboardInterrupt):
    """Raised inside a running job by SIGTERM/SIGINT to abandon it. A KeyboardInterrupt, so every
    job unwinds as on Ctrl-C (and no `except Exception` in a job swallows it)."""


@dataclass(frozen=True)
class JobRun:
    """What a job is told when it runs."""

    job: str
    slot: datetime
    attempt: int
    member: str
    progress: Callable[[str], None]


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[JobRun], JobOutcome]
    cron: str | None = None  # None: the job runs only after `follows`
    follows: str | None = None  # runs after each successful run of that job, in its slot and lock
    ha: bool = False  # with Patroni, only the member the HA choice picks runs it
    # On SIGTERM: "abandon" raises JobInterrupted inside the job (it must be safe to stop anywhere);
    # "finish" lets it end first (a second signal abandons it anyway).
    on_stop: Literal["abandon", "finish"] = "abandon"


Result = Literal["ok", "failed", "skipped", "interrupted", "busy"]


@dataclass(frozen=True)
class JobEvent:
    """One handled slot of one job, as listeners (alerts, metrics) and --once see it."""

    job: str
    slot: datetime
    result: Result
    member: str
    detail: str = ""
    attempts: int = 0
    duration_s: float = 0.0
    recovered: bool = False  # ok after the job's previous slot failed

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "slot": self.slot.isoformat(), "result": self.result, "member": self.member,
                "detail": self.detail, "attempts": self.attempts, "duration_s": round(self.duration_s, 3),
                "recovered": self.recovered}


@dataclass(frozen=True)
class JobPlan:
    """What `schedule show` tells about one job."""

    job: str
    cron: str | None
    follows: str | None
    next_run: datetime | None  # None for jobs that only follow another
    missed: datetime | None  # a slot owed now (it runs at once)
    last: JobRecord | None

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "cron": self.cron, "follows": self.follows,
                "next_run": self.next_run.isoformat() if self.next_run else None,
                "missed": self.missed.isoformat() if self.missed else None,
                "last": self.last.model_dump(mode="json") if self.last else None}


Listener = Callable[[JobEvent], None]


@dataclass
class Scheduler:
    """Runs jobs on their slots. `run` is the daemon loop; `run_due` one pass (`schedule run --once`)."""

    jobs: Sequence[Job]
    store: StateStore
    lock: Callable[[], AbstractContextManager[object]]
    zone: ZoneInfo
    member: str
    retries: int = 2
    retry_delay: timedelta = timedelta(minutes=5)
    clock: Clock = field(default_factory=RealClock)
    lock_poll: timedelta = LOCK_POLL
    choose: Callable[[], Choice] | None = None  # the HA choice for jobs with ha=True; None: this node
    on_result: list[Listener] = field(default_factory=list)  # every handled slot
    on_failure: list[Listener] = field(default_factory=list)  # a slot failed after its retries
    on_recovery: list[Listener] = field(default_factory=list)  # a success after a failed slot
    _handled: dict[str, datetime] = field(default_factory=dict, init=False)  # slots this process settled
    _running: Job | None = field(default=None, init=False)
    _signals: int = field(default=0, init=False)
    _raised: bool = field(default=False, init=False)  # the running job was told to stop: once is enough

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Run jobs as they fall due until stop is set (SIGTERM, SIGINT or a test)."""
        log.info("scheduler started on %s: %s", self.member, "; ".join(
            f"{j.name} '{j.cron}'" if j.cron else f"{j.name} after {j.follows}" for j in self.jobs))
        while not stop.is_set():
            try:
                self.run_due(stop, wait=True)
                wake = self.next_wakeup()
            except PgvaultError as exc:  # the repository is unreachable: keep the daemon, try again later
                log.error("error: %s; trying again in %d s", redact(exc.message), ERROR_BACKOFF.total_seconds())
                wake = self.clock.now() + ERROR_BACKOFF
            if self.clock.sleep_until(wake, stop):
                break
        log.info("scheduler stopped")

    def run_due(self, stop: threading.Event, *, wait: bool) -> list[JobEvent]:
        """Handle every job whose slot is due now, each once. Without wait, a lock held by another
        process means "leave it to that process" instead of waiting for it."""
        events: list[JobEvent] = []
        for job in self._cron_jobs():
            if stop.is_set():
                break
            slot = self._due(job, self._state(), self.clock.now())
            if slot is not None:
                events += self._handle(job, slot, stop, wait=wait)
        return events

    def next_wakeup(self) -> datetime:
        state = self._state()
        return min((self._next(job, state) for job in self._cron_jobs()), default=self.clock.now() + timedelta(days=1))

    def plan(self) -> list[JobPlan]:
        state = self.store.read()
        now = self.clock.now()
        view = state or SchedulerState(created=now)
        plans = []
        for job in self.jobs:
            last = view.jobs.get(job.name)
            if job.cron is None:
                plans.append(JobPlan(job.name, None, job.follows, None, None, last))
                continue
            missed = self._due(job, view, now)
            upcoming = next_slot(job.cron, max(now, self._settled_until(job, view)), self.zone)
            plans.append(JobPlan(job.name, job.cron, None, upcoming, missed, last))
        return plans

    # -- due slots -------------------------------------------------------------------------------------
    def _cron_jobs(self) -> list[Job]:
        return [job for job in self.jobs if job.cron is not None]

    def _state(self) -> SchedulerState:
        state = self.store.read()
        if state is not None:
            return state
        # First start on this repository: nothing is owed from before it.
        state = SchedulerState(created=self.clock.now())
        with contextlib.suppress(LockedError), self.lock():
            if self.store.read() is None:
                self.store.write(state)
        return self.store.read() or state

    def _settled_until(self, job: Job, state: SchedulerState) -> datetime:
        """Slots of job up to this moment need nothing more from this node."""
        marks = [state.created]
        if job.name in self._handled:
            marks.append(self._handled[job.name])
        record = state.jobs.get(job.name)
        # A slot still open on this very node (its process was killed or stopped) stays owed.
        if record is not None and not (record.status in OPEN and record.member == self.member):
            marks.append(record.slot)
        return max(marks)

    def _next(self, job: Job, state: SchedulerState) -> datetime:
        assert job.cron is not None
        return next_slot(job.cron, self._settled_until(job, state), self.zone)

    def _due(self, job: Job, state: SchedulerState, now: datetime) -> datetime | None:
        """The slot to run now, if any: after downtime the latest missed slot, once for all."""
        assert job.cron is not None
        if self._next(job, state) > now:
            return None
        return latest_slot(job.cron, now, self.zone)

    def _elsewhere(self, job: Job, slot: datetime, state: SchedulerState) -> JobEvent | None:
        """A skip event when slot is settled, or assigned to another node; None when it is ours to run."""
        record = state.jobs.get(job.name)
        if record is None or record.slot < slot:
            return None
        if record.status in ("ok", "failed"):
            detail = f"already {record.status} on {record.member}"
        elif record.member != self.member:
            detail = (f"{record.member} takes it ({record.reason})" if record.status != "interrupted" else
                      f"interrupted on {record.member}, which runs it again when its scheduler starts")
        else:
            return None
        return JobEvent(job.name, slot, "skipped", self.member, detail)

    # -- handling a slot -------------------------------------------------------------------------------
    def _handle(self, job: Job, slot: datetime, stop: threading.Event, *, wait: bool) -> list[JobEvent]:
        waiting_since: datetime | None = None
        while not stop.is_set():
            skipped = self._elsewhere(job, slot, self.store.read() or SchedulerState(created=slot))
            if skipped is not None:
                return self._settle(job, slot, [skipped])
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.lock())
                except LockedError as exc:
                    if not wait:
                        return self._emit([JobEvent(job.name, slot, "busy", self.member, redact(exc.message))])
                    now = self.clock.now()
                    if waiting_since is None:
                        waiting_since = now
                        log.info("%s waits for the scheduler lock: %s", job.name, redact(exc.message))
                    assert job.cron is not None
                    if now + self.lock_poll >= next_slot(job.cron, slot, self.zone):
                        return self._settle(job, slot, [JobEvent(
                            job.name, slot, "skipped", self.member,
                            "the scheduler lock stayed taken until the next slot")])
                else:
                    return self._settle(job, slot, self._run_locked(job, slot, stop))
            if self.clock.sleep_until(self.clock.now() + self.lock_poll, stop):
                break
        return []

    def _settle(self, job: Job, slot: datetime, events: list[JobEvent]) -> list[JobEvent]:
        if not any(e.result == "interrupted" for e in events):
            self._handled[job.name] = max(slot, self._handled.get(job.name, slot))
        return self._emit(events)

    def _run_locked(self, job: Job, slot: datetime, stop: threading.Event) -> list[JobEvent]:
        state = self.store.read() or SchedulerState(created=min(self.clock.now(), slot))
        skipped = self._elsewhere(job, slot, state)  # settled while we waited for the lock
        if skipped is not None:
            return [skipped]
        record = state.jobs.get(job.name)
        events = []
        if record is not None and record.slot < slot and record.status in ("pending", "running"):
            events.append(self._lost(job, record))
        ours = record is not None and record.slot == slot  # owed here: assigned to us, or our run was cut short
        # A run whose process died counts as an attempt, so a job that kills its process is not retried forever.
        first = record.attempts + 1 if ours and record is not None and record.status == "running" else 1
        # The HA choice is made once per slot, by the first node to handle it, and recorded.
        event = self._attempts(job, slot, stop, first=first, decide=job.ha and self.choose is not None and not ours)
        events.append(event)
        if event.result == "ok":
            for follower in (j for j in self.jobs if j.follows == job.name):
                if stop.is_set():
                    break
                events.append(self._attempts(follower, slot, stop, first=1, decide=False))
        return events

    def _lost(self, job: Job, record: JobRecord) -> JobEvent:
        """An earlier slot that its node never started or never finished, now superseded: a failure to
        report, or a node whose scheduler is down or misnamed would go unnoticed night after night."""
        detail = (f"slot {_fmt(record.slot)} was assigned to {record.member}, whose scheduler never started it "
                  f"(is it running there, with schedule.member: {record.member}?)" if record.status == "pending" else
                  f"slot {_fmt(record.slot)} never finished on {record.member} (its scheduler stopped mid-job)")
        lost = record.model_copy(update={"status": "failed", "failing": True, "detail": detail})
        self._record(job, lost)
        event = JobEvent(job.name, record.slot, "failed", record.member, detail, record.attempts)
        _log_result(event)
        return event

    def _attempts(self, job: Job, slot: datetime, stop: threading.Event, *, first: int, decide: bool) -> JobEvent:
        """Run job for slot, retried per policy; record every step in the state."""
        total = self.retries + 1
        previous = (self.store.read() or SchedulerState(created=slot)).jobs.get(job.name)
        failing = previous.failing if previous is not None else False
        last_ok = previous.last_ok if previous is not None else None
        reason = previous.reason if previous is not None and previous.slot == slot else ""
        record = JobRecord(slot=slot, status="running", member=self.member, reason=reason, failing=failing,
                           last_ok=last_ok, attempts=first - 1)
        if first > total:
            record = record.model_copy(update={
                "status": "failed", "failing": True, "finished": self.clock.now(),
                "detail": f"its scheduler stopped during each of {first - 1} attempt(s); not tried again"})
            self._record(job, record)
            return self._failed(job, slot, record)
        for attempt in range(first, total + 1):
            if stop.is_set():
                return self._interrupted(job, slot, record.model_copy(update={"status": "interrupted"}),
                                         begun=not decide)
            if decide:
                assert self.choose is not None
                try:
                    choice = self.choose()
                except PgvaultError as exc:
                    record = record.model_copy(update={"attempts": attempt, "detail": redact(exc.message)})
                    log.warning("%s: cannot choose the node that takes it (attempt %d/%d): %s", job.name, attempt,
                                total, record.detail)
                    if attempt < total and self._retry_wait(job, stop):
                        return self._interrupted(job, slot, record, begun=False)
                    continue
                decide = False
                record = record.model_copy(update={"reason": choice.reason})
                if choice.member != self.member:
                    self._record(job, record.model_copy(update={"status": "pending", "member": choice.member}))
                    return JobEvent(job.name, slot, "skipped", self.member,
                                    f"{choice.member} takes it ({choice.reason})")
            record = record.model_copy(update={"status": "running", "attempts": attempt, "started": self.clock.now(),
                                               "finished": None, "duration_s": None, "detail": ""})
            self._record(job, record)
            log.info("%s started, slot %s, on %s (attempt %d/%d)%s", job.name, _fmt(slot), self.member, attempt,
                     total, f": {record.reason}" if record.reason else "")
            outcome, duration = self._attempt(job, slot, attempt, stop)
            record = record.model_copy(update={"finished": self.clock.now(), "duration_s": round(duration, 3)})
            if outcome is None:
                return self._interrupted(job, slot, record.model_copy(update={
                    "status": "interrupted", "detail": "stopped by a signal; abandoned"}))
            record = record.model_copy(update={"detail": outcome.detail})
            if outcome.ok:
                record = record.model_copy(update={"status": "ok", "failing": False, "last_ok": record.finished})
                self._record(job, record)
                event = JobEvent(job.name, slot, "ok", self.member, outcome.detail, attempt, duration,
                                 recovered=failing)
                _log_result(event)
                return event
            log.warning("%s attempt %d/%d failed after %.1fs: %s", job.name, attempt, total, duration,
                        outcome.detail)
            if attempt < total:
                self._record(job, record)
                if self._retry_wait(job, stop):
                    return self._interrupted(job, slot, record.model_copy(update={"status": "interrupted"}))
        record = record.model_copy(update={"status": "failed", "failing": True,
                                           "finished": record.finished or self.clock.now()})
        self._record(job, record)
        return self._failed(job, slot, record)

    def _retry_wait(self, job: Job, stop: threading.Event) -> bool:
        log.info("%s runs again in %d s (schedule.retry_delay)", job.name, self.retry_delay.total_seconds())
        return self.clock.sleep_until(self.clock.now() + self.retry_delay, stop)

    def _attempt(self, job: Job, slot: datetime, attempt: int,
                 stop: threading.Event) -> tuple[JobOutcome | None, float]:
        """One run of the job: its outcome (None when a signal abandoned it) and how long it took."""
        def progress(message: str) -> None:  # core progress lines mostly name their job already
            job_log.info("%s", message if message.startswith(job.name) else f"{job.name}: {message}")

        run = JobRun(job.name, slot, attempt, self.member, progress)
        outcome: JobOutcome | None = None
        began = time.monotonic()
        try:
            try:
                self._running, self._raised = job, False
                if stop.is_set():  # a signal came just before the job became interruptible
                    raise JobInterrupted("stop")
                outcome = job.run(run)
            finally:
                self._running = None
        except KeyboardInterrupt:
            # Ours (JobInterrupted), or a job's own signal handling (the drill's) turning SIGTERM into
            # Ctrl-C after its cleanup: either way the scheduler stops. The outcome stays None unless
            # the job had already returned when the signal came.
            stop.set()
        except PgvaultError as exc:
            outcome = JobOutcome(False, redact(exc.message))
        except Exception as exc:  # a bug in one job must not end the scheduler
            log.debug("%s raised", job.name, exc_info=True)
            outcome = JobOutcome(False, redact(f"unexpected {type(exc).__name__}: {exc}"))
        return outcome, time.monotonic() - began

    def _record(self, job: Job, record: JobRecord) -> None:
        state = self.store.read() or SchedulerState(created=min(self.clock.now(), record.slot))
        state.jobs[job.name] = record
        self.store.write(state)

    def _failed(self, job: Job, slot: datetime, record: JobRecord) -> JobEvent:
        event = JobEvent(job.name, slot, "failed", self.member, record.detail, record.attempts,
                         record.duration_s or 0.0)
        _log_result(event)
        return event

    def _interrupted(self, job: Job, slot: datetime, record: JobRecord, *, begun: bool = True) -> JobEvent:
        """Stopped by a signal. Once the slot is this node's, the state says so and the node runs it again
        when it starts; before the HA choice was made nothing is recorded, and whoever comes next decides."""
        if begun:
            self._record(job, record.model_copy(update={"status": "interrupted"}))
        event = JobEvent(job.name, slot, "interrupted", self.member, record.detail or "stopped by a signal",
                         record.attempts, record.duration_s or 0.0)
        _log_result(event)
        return event

    def _emit(self, events: list[JobEvent]) -> list[JobEvent]:
        for event in events:
            if event.result in ("skipped", "busy"):
                _log_result(event)
            targets = list(self.on_result)
            if event.result == "failed":
                targets += self.on_failure
            if event.result == "ok" and event.recovered:
                targets += self.on_recovery
            for listener in targets:
                try:
                    listener(event)
                except Exception as exc:  # an alert or metric that fails must not stop the schedule
                    log.warning("a listener of %s failed: %s", event.job, redact(f"{type(exc).__name__}: {exc}"))
        return events

    # -- signals ---------------------------------------------------------------------------------------
    def request_stop(self, stop: threading.Event, signame: str) -> None:
        """What SIGTERM/SIGINT do: stop the loop; abandon the running job unless it is one to finish
        (then a second signal abandons it). Called from the signal handler, in the main thread."""
        self._signals += 1
        stop.set()
        job = self._running
        if job is None:
            log.info("%s: stopping", signame)
            return
        if self._raised:
            return  # the job is unwinding (cleaning up): a further signal must not cut that short
        if job.on_stop == "abandon" or self._signals > 1:
            log.info("%s: abandoning %s", signame, job.name)
            self._raised = True
            raise JobInterrupted(signame)
        log.info("%s: letting %s finish first (a second signal abandons it)", signame, job.name)


@contextlib.contextmanager
def stop_on_signals(scheduler: Scheduler, stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT stop the scheduler cleanly while inside this block (main thread only)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        scheduler.request_stop(stop, signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_result(event: JobEvent) -> None:
    """The one line per handled slot: job, result, duration, slot, detail."""
    level = logging.WARNING if event.result in ("failed", "interrupted") else logging.INFO
    extra = " (recovered)" if event.recovered else ""
    log.log(level, "%s %s%s %.1fs slot %s%s", event.job, event.result, extra, event.duration_s, _fmt(event.slot),
            f": {event.detail}" if event.detail else "")


# ---- the policy's jobs ------------------------------------------------------------------------------

def policy_jobs(policy: Policy, storage: Storage) -> list[Job]:
    """backup, expire after it, verify and drill, calling the core functions (imported when they run)."""

    def backup(run: JobRun) -> JobOutcome:
        from pgvault.backup import run_backup

        record = run_backup(policy, storage, progress=run.progress,
                            annotations={"scheduled": _fmt(run.slot), "node": run.member})
        return JobOutcome(True, f"backup {record.id}, {len(record.parts)} part(s), "
                                f"{format_size(record.stored_size)} stored")

    def expire(run: JobRun) -> JobOutcome:
        from pgvault.expire import run_expire

        result = run_expire(policy, storage, now=datetime.now(UTC), progress=run.progress)
        return JobOutcome(True, redact(str(result.as_dict().get("summary") or "")))

    def verify(run: JobRun) -> JobOutcome:
        from pgvault.verify import run_verify

        report = run_verify(policy, storage, progress=run.progress)
        if report.ok:
            checked = ", ".join(f"{n} {what}" for what, n in report.checked.items())
            return JobOutcome(True, f"report {report.id}: no problems" + (f" ({checked})" if checked else ""))
        first = "; ".join(str(problem) for problem in report.problems[:3])
        return JobOutcome(False, redact(f"report {report.id}: {len(report.problems)} problem(s): {first}"))

    def drill(run: JobRun) -> JobOutcome:
        from pgvault import drill as drills

        # The drill's own signal handling: SIGTERM becomes Ctrl-C, but not while the scratch instance
        # is being removed; it then ends the job like our own interruption does.
        with drills.interrupt_on_signals():
            report = drills.run_drill(policy, storage, progress=run.progress)
        if report.ok:
            rto = f"RTO {report.rto_seconds:.0f}s" if report.rto_seconds is not None else ""
            rpo = f"RPO {report.rpo_seconds:.0f}s" if report.rpo_seconds is not None else ""
            return JobOutcome(True, ", ".join(x for x in (f"report {report.id}", rto, rpo) if x))
        return JobOutcome(False, redact(f"report {report.id}: " + "; ".join(report.failures[:3])))

    s = policy.schedule
    jobs = [
        # Abandoning a backup is safe anywhere: without its sentinel it is invisible debris that the
        # next backup removes (guarantee 3).
        Job("backup", backup, cron=s.backup, ha=True),
        # Expiry deletes (sentinels first); it is short, so it finishes rather than stopping midway.
        Job("expire", expire, follows="backup", on_stop="finish"),
        Job("verify", verify, cron=s.verify),  # reads only (its report is written last)
        Job("drill", drill, cron=s.drill),  # removes its scratch instance as it unwinds
    ]
    # A job switched off (`off`) is not this node's; expire goes with backup.
    off = {name for name, cron in (("backup", s.backup), ("verify", s.verify), ("drill", s.drill))
           if cron == CRON_OFF}
    return [job for job in jobs if job.name not in off and job.follows not in off]


def this_member(config: ScheduleConfig) -> str:
    return config.member or socket.gethostname()


def patroni_chooser(config: ScheduleConfig, member: str) -> Callable[[], Choice]:
    from pgvault.ha.patroni import PatroniClient, choose_backup_member

    client = PatroniClient(config.patroni_urls)

    def choose() -> Choice:
        members = client.members()
        if member not in {m.name for m in members}:
            log.warning("this node, %r, is not a member of the Patroni cluster (%s): it never takes a backup; "
                        "set schedule.member to its Patroni name", member, ", ".join(sorted(m.name for m in members)))
        return choose_backup_member(members, config.backup_from, config.max_replica_lag)

    return choose


def build_scheduler(policy: Policy, storage: Storage, *, jobs: Sequence[Job] | None = None,
                    clock: Clock | None = None) -> Scheduler:
    """The scheduler of a policy: its jobs (or the given ones), its lock, state, zone and HA choice."""
    from pgvault.repo import job_lock

    config = policy.schedule
    member = this_member(config)
    return Scheduler(
        jobs=list(jobs) if jobs is not None else policy_jobs(policy, storage),
        store=StateStore(storage, policy.cluster),
        lock=lambda: job_lock(policy.repository, storage, policy.cluster, LOCK_JOB),
        zone=ZoneInfo(config.timezone),
        member=member,
        retries=config.retries,
        retry_delay=config.retry_delay,
        clock=clock or RealClock(),
        choose=patroni_chooser(config, member) if config.patroni_urls else None,
    )


# ---- cron-driven setups -----------------------------------------------------------------------------

def cron_table(policy: Policy, config_path: str, command: Sequence[str], user: str) -> str:
    """/etc/cron.d lines that drive the schedule from cron: `schedule run --once` at each job's time
    and at boot. --once runs only what is due, so a line firing late or twice never runs a job early
    or twice; @reboot makes a run missed while the machine was off happen once at start-up."""
    import shlex

    s = policy.schedule
    run = " ".join(shlex.quote(part) for part in [*command, "--config", config_path, "-q", "schedule", "run",
                                                    "--once"])
    run = run.replace("%", "\\%")  # cron turns a bare % into a newline
    lines = [
        f"# pgvault schedule of cluster {policy.cluster}, from {config_path} (`pgvault cron`).",
        f"# Install as /etc/cron.d/pgvault-{policy.cluster}; run either these lines or `pgvault schedule run`.",
        f"# Each line runs whatever is due then. Times are read in {s.timezone}: cronie honours CRON_TZ;",
        f"# with a cron that does not, the system time zone must be {s.timezone}.",
        "SHELL=/bin/sh",
        f"CRON_TZ={s.timezone}",
    ]
    for name, cron in (("backup, then expire", s.backup), ("verify", s.verify), ("drill", s.drill)):
        lines += [f"# {name}: off on this node"] if cron == CRON_OFF else [f"# {name}", f"{cron} {user} {run}"]
    lines.append("# a run missed while the machine was off")
    lines.append(f"@reboot {user} {run}")
    return "\n".join(lines) + "\n"
