"""expire and keep: the retention commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from pgvault.cli import Context, Parsed, _emit_json, cli, pass_context
from pgvault.units import format_size

if TYPE_CHECKING:
    from pgvault.expire import ExpireResult


def _moment(text: str) -> datetime:
    from pgvault.targets import parse_target_time

    return parse_target_time(text)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what would be kept and deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
# Hidden: the clock expire plans for. Tests use it to put backups on either side of a window without
# waiting; an explicit flag, unlike an environment variable, cannot leak into a scheduled run.
@click.option("--now", "now", type=Parsed("TIME", _moment), hidden=True)
@pass_context
def expire(ctx: Context, dry_run: bool, as_json: bool, now: datetime | None) -> None:
    """Apply the retention policy: delete expired backups, the WAL nobody needs, and debris.

    Keeps pinned backups, the newest retention.min_backups, the newest backup of each of the last
    daily/weekly/monthly days, ISO weeks and months (in retention.timezone), and what restores any
    moment of retention.pitr_window. Prints every backup kept with its reasons and everything deleted.

    Example: pgvault --config /etc/pgvault/demo.yaml expire --dry-run
    """
    from pgvault.expire import run_expire

    policy = ctx.policy()
    result = run_expire(policy, ctx.storage(policy), now=now or datetime.now(UTC), dry_run=dry_run,
                        progress=ctx.progress)
    if as_json:
        _emit_json(result.as_dict())
        return
    _render(result)


def _render(result: ExpireResult) -> None:
    plan = result.plan
    verb = "would delete" if result.dry_run else "deleted"
    click.echo(f"expire: cluster {result.cluster}, now {plan.now.isoformat(sep=' ', timespec='seconds')}, "
               f"PITR window from {plan.cutoff.isoformat(sep=' ', timespec='seconds')}")

    def when(backup_id: str) -> str:
        record = result.records[backup_id]
        return f"{record.stop_time:%Y-%m-%d %H:%M:%S%z} TL{record.timeline}"

    for kept in plan.kept:
        click.echo(f"keep         {kept.id}  {when(kept.id)}  {', '.join(kept.reasons)}")
    for backup_id in plan.deleted:
        click.echo(f"{verb:<12} {backup_id}  {when(backup_id)}")
    for wal in plan.deleted_wal_ranges():
        span = wal.first_name if wal.first == wal.last else f"{wal.first_name}..{wal.last_name}"
        click.echo(f"{verb:<12} WAL {span} ({wal.files} file(s))")
    for backup_id in result.debris:
        click.echo(f"{verb:<12} debris of incomplete backup {backup_id}")
    for stale in plan.stale_pins:
        click.echo(f"warning: pin for {stale} names no backup; remove it with pgvault keep {stale} --release",
                   err=True)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    done = "dry run, nothing deleted: " if result.dry_run else ""
    click.echo(f"{done}{plan.summary}; {'would free' if result.dry_run else 'freed'} "
               f"{format_size(result.freed_bytes)}")


@cli.command()
@click.argument("backup_id", metavar="ID")
@click.option("--release", is_flag=True, help="Remove the pin: expire may delete the backup again.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def keep(ctx: Context, backup_id: str, release: bool, as_json: bool) -> None:
    """Pin a backup so expire never deletes it (with the WAL it needs), or release the pin.

    Example: pgvault --config /etc/pgvault/demo.yaml keep 20261120T020000Z
    """
    from pgvault import expire as expire_mod

    policy = ctx.policy()
    storage = ctx.storage(policy)
    if release:
        result = expire_mod.release(policy, storage, backup_id)
    else:
        result = expire_mod.pin(policy, storage, backup_id, now=datetime.now(UTC))
    if as_json:
        _emit_json(result.as_dict())
        return
    messages: dict[tuple[bool, bool], Any] = {
        (True, True): f"backup {backup_id} pinned: expire keeps it until pgvault keep {backup_id} --release",
        (True, False): f"backup {backup_id} was already pinned",
        (False, True): f"backup {backup_id} released: expire may delete it",
        (False, False): f"backup {backup_id} was not pinned",
    }
    click.echo(messages[(result.pinned, result.changed)])
