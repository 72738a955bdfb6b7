"""schedule run, schedule show and cron: the scheduler commands."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from pgvault.cli import Context, _emit_json, cli, pass_context
from pgvault.errors import PgvaultError, UsageError

if TYPE_CHECKING:
    from pgvault.config import Policy
    from pgvault.scheduler import JobEvent, JobPlan, Scheduler


class JobsFailed(PgvaultError):
    """`schedule run --once`: a job failed after its retries."""


@cli.group()
def schedule() -> None:
    """Run the policy's jobs on their schedules: backup (then expire), verify and drill.

    Example: pgvault --config /etc/pgvault/prod.yaml schedule show
    """


def _log_to_stderr(quiet: bool) -> None:
    """Plain lines on stderr, each with its UTC time: job, result, duration, slot, detail."""
    import logging
    import sys
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logger = logging.getLogger("pgvault")
    for old in [h for h in logger.handlers if getattr(h, "pgvault_schedule", False)]:
        logger.removeHandler(old)
    handler.pgvault_schedule = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    # -q (cron lines use it): only failures and warnings, so cron mails only when something is wrong.
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _wire_alerts(scheduler: Scheduler, policy: Policy) -> None:
    """Failures (after retries) and recoveries go to the policy's webhooks."""

    def send(event: JobEvent) -> None:
        from pgvault.alerts import AlertEvent, notify

        failed = event.result == "failed"
        what = f"{event.job} of cluster {policy.cluster}"
        message = (f"{what} failed after {event.attempts} attempt(s): {event.detail}" if failed
                   else f"{what} works again: {event.detail}")
        notify(policy, AlertEvent(cluster=policy.cluster, job=event.job, status="failed" if failed else "recovered",
                                  message=message, details={"slot": event.slot.isoformat(), "node": event.member,
                                                            "attempts": event.attempts,
                                                            "duration_s": round(event.duration_s, 3)}))

    scheduler.on_failure.append(send)
    scheduler.on_recovery.append(send)


@schedule.command("run")
@click.option("--once", is_flag=True,
              help="Run the jobs that are due now (a missed run included), then exit; for cron.")
@pass_context
def run(ctx: Context, once: bool) -> None:
    """Run the policy's jobs on their schedules, in the foreground, until SIGTERM or Ctrl-C.

    One job at a time per cluster and repository (a lock in the repository); a run missed while
    the scheduler was down runs once at start-up; a failed job is retried (schedule.retries,
    schedule.retry_delay) and then alerted. With schedule.patroni_urls only the node Patroni's
    state picks takes the backup. SIGTERM or SIGINT stops it cleanly with exit 0: a running backup,
    verify or drill is abandoned (a backup without its sentinel is debris the next one removes),
    a running expire finishes first. With --once: exit 1 if a job failed.

    Example: pgvault --config /etc/pgvault/prod.yaml schedule run
    """
    import contextlib
    import logging
    import threading

    from pgvault.catalog import Catalog
    from pgvault.scheduler import build_scheduler, stop_on_signals

    policy = ctx.policy()
    storage = ctx.storage(policy)
    # A repository that `init` never bound (a wrong URL, an unmounted directory) gets no scheduler
    # state written into it, and the mistake shows at start-up rather than at 02:00.
    Catalog(storage, policy.cluster).require_cluster_info()
    _log_to_stderr(ctx.quiet)
    scheduler = build_scheduler(policy, storage)
    _wire_alerts(scheduler, policy)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        stack.enter_context(stop_on_signals(scheduler, stop))
        if once:
            events = scheduler.run_due(stop, wait=False)
        else:
            if policy.schedule.metrics_listen:
                from pgvault.metrics import serve

                server = serve(policy, storage, policy.schedule.metrics_listen)
                stack.callback(server.stop)
                logging.getLogger("pgvault.scheduler").info("metrics at %s", server.url)
            scheduler.run(stop)
            return
    failed = sorted({event.job for event in events if event.result == "failed"})
    if failed:
        raise JobsFailed(f"{', '.join(failed)} failed (see the lines above)",
                         hint="pgvault schedule show tells the last result of each job")


def _when(moment: datetime | None, zone: Any) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if moment else "-"


def _last(plan: JobPlan, zone: Any) -> str:
    last = plan.last
    if last is None:
        return "never"
    took = f" in {last.duration_s:.1f}s" if last.duration_s is not None else ""
    text = f"{last.status} on {last.member}{took}, slot {_when(last.slot, zone)}"
    if last.status in ("pending", "running") and last.reason:
        return f"{text} ({last.reason})"
    return text + (f": {last.detail}" if last.detail else "")


@schedule.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_context
def show(ctx: Context, as_json: bool) -> None:
    """Show when each job runs next, and how its last run went (from the repository).

    Example: pgvault --config /etc/pgvault/prod.yaml schedule show --json
    """
    from zoneinfo import ZoneInfo

    from pgvault.scheduler import build_scheduler

    policy = ctx.policy()
    scheduler = build_scheduler(policy, ctx.storage(policy))
    plans = scheduler.plan()
    s = policy.schedule
    ha = ({"backup_from": s.backup_from, "max_replica_lag": s.max_replica_lag, "patroni_members": len(s.patroni_urls)}
          if s.patroni_urls else None)
    if as_json:
        _emit_json({"cluster": policy.cluster, "timezone": s.timezone, "member": scheduler.member, "ha": ha,
                    "retries": s.retries, "retry_delay_s": int(s.retry_delay.total_seconds()),
                    "jobs": [plan.as_dict() for plan in plans]})
        return
    zone = ZoneInfo(s.timezone)
    where = (f"backups from {'a healthy replica, else the leader' if s.backup_from == 'replica' else 'the leader'}"
             " (Patroni)" if ha else "every job runs on this node")
    click.echo(f"cluster {policy.cluster}; this node: {scheduler.member}; {where}")
    rows = []
    for plan in plans:
        when = plan.cron or f"after {plan.follows}"
        upcoming = (f"{_when(plan.next_run, zone)}" if plan.next_run else f"after each {plan.follows}")
        if plan.missed:
            upcoming = f"now (missed {_when(plan.missed, zone)}), then {upcoming}"
        rows.append((plan.job, when, upcoming, _last(plan, zone)))
    widths = [max(len(row[i]) for row in [("job", "schedule", "next run", ""), *rows]) for i in range(3)]
    click.echo(f"{'job':<{widths[0]}}  {'schedule':<{widths[1]}}  {'next run':<{widths[2]}}  last run")
    for row in rows:
        click.echo(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")


_USER = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$", re.IGNORECASE)


@cli.command("cron")
@click.option("--user", default="postgres", show_default=True, metavar="NAME",
              help="The user field of each line (the /etc/cron.d format).")
@pass_context
def cron(ctx: Context, user: str) -> None:
    """Print /etc/cron.d lines that drive the schedule from cron instead of `schedule run`.

    One line per job at its time, and one at boot, each running `schedule run --once` with
    absolute paths: it runs what is due then (a missed run included) under the same lock, state,
    retries and HA choice as the daemon.

    Example: pgvault --config /etc/pgvault/prod.yaml cron | sudo tee /etc/cron.d/pgvault-prod
    """
    from zoneinfo import ZoneInfo

    from pgvault.pg.recovery import self_command
    from pgvault.scheduler import cron_table

    if not _USER.match(user):
        raise UsageError(f"--user {user!r} is not a user name; give the OS user that runs pgvault, e.g. postgres")
    policy = ctx.policy()
    click.echo(cron_table(policy, str(ctx.policy_path()), self_command(), user), nl=False)
    zone = ZoneInfo(policy.schedule.timezone)
    now = datetime.now().astimezone()
    if any((now + delta).astimezone(zone).utcoffset() != (now + delta).astimezone().utcoffset()
           for delta in (_days(0), _days(182))):
        click.echo(f"warning: this machine's time zone is not {policy.schedule.timezone} (schedule.timezone); "
                   "the lines rely on CRON_TZ, which only some crons (cronie) honour", err=True)


def _days(n: int) -> Any:
    from datetime import timedelta

    return timedelta(days=n)
