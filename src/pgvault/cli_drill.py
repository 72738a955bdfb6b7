"""drill: the DR drill command."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from pgvault.cli import Context, Parsed, _emit_json, _target_time, cli, pass_context
from pgvault.errors import PgvaultError
from pgvault.units import format_size


@cli.command()
@click.option("--target-time", type=Parsed("TIME", _target_time),
              help="Recover up to this moment (with a time zone). Default: the end of the archive.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_context
def drill(ctx: Context, target_time: datetime | None, as_json: bool) -> None:
    """Restore into a scratch instance, check it, and report RTO and RPO (a DR drill).

    Restores the newest backup before the target into a temporary directory, starts it on a
    private socket with archiving off, waits for recovery, runs pg_amcheck over every database and
    the policy's drill.checks, stores the report in the repository and removes the copy. Exits 1
    if anything failed.

    Example: pgvault --config /etc/pgvault/prod.yaml drill --target-time '2026-11-20 14:30:00+00'
    """
    from pgvault.drill import interrupt_on_signals, run_drill

    policy = ctx.policy()
    storage = ctx.storage(policy)
    with interrupt_on_signals():
        report = run_drill(policy, storage, target_time=target_time, progress=ctx.progress)
    if as_json:
        _emit_json(report.as_dict())
    else:
        click.echo(render(report.as_dict()))
    if not report.ok:
        first = report.failures[0] if report.failures else "the scratch instance was not cleaned up"
        more = f" (and {len(report.failures) - 1} more failure(s))" if len(report.failures) > 1 else ""
        raise PgvaultError(f"drill failed: {first.splitlines()[0]}{more}",
                           hint="the report above says what failed; docs/dr-drill.md says what to do")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _when(iso: str, timespec: str = "seconds") -> str:
    return datetime.fromisoformat(iso).isoformat(sep=" ", timespec=timespec)


def render(data: dict[str, Any]) -> str:
    """The report as people read it: the verdict, the numbers, then each step, amcheck and check."""
    lines = [f"DR drill of cluster {data['cluster']}: {'OK' if data['ok'] else 'FAILED'}"
             + (f" (report {data['id']})" if data["id"] else "")]
    backup = data["backup"]
    if backup:
        lines.append(f"  backup        {backup['id']} (timeline {backup['timeline']}, consistent at "
                     f"{_when(backup['stop_time'])}, LSN {backup['stop_lsn']})")
    lines.append(f"  target        {data['target']}")
    lines.append(f"  RTO           {_seconds(data['rto_seconds'])}  (drill start until the copy answered queries)")
    reference = "target" if data["target_time"] else "drill start"
    if data["last_replayed_at"]:
        basis = f"the last replayed transaction, {_when(data['last_replayed_at'], 'milliseconds')}"
    else:
        basis = "the backup's start: no transaction was replayed after it"
    if data["rpo_seconds"] is not None:
        lines.append(f"  RPO           {_seconds(data['rpo_seconds'])}  ({reference} minus {basis})")
    else:
        lines.append("  RPO           -")
    sizes = data["sizes"]
    if sizes["backup_stored_bytes"] is not None:
        restored = format_size(sizes["restored_bytes"]) if sizes["restored_bytes"] is not None else "-"
        lines.append(f"  sizes         backup {format_size(sizes['backup_stored_bytes'])} stored, "
                     f"{format_size(sizes['backup_raw_bytes'])} raw; restored data {restored}")
    lines.append("  steps")
    for step in data["steps"]:
        lines.append(f"    {step['name']:<10} {step['seconds']:8.2f} s  {'ok' if step['ok'] else 'FAILED'}")
    amcheck = data["amcheck"]
    if not amcheck["enabled"]:
        lines.append("  amcheck       off (drill.amcheck: false)")
    elif amcheck["ok"] is None:
        lines.append("  amcheck       not run")
    else:
        verdict = "ok" if amcheck["ok"] else f"FAILED (exit {amcheck['exit_code']})"
        lines.append(f"  amcheck       {verdict}: databases {', '.join(amcheck['databases']) or '-'}")
        if not amcheck["ok"]:
            lines.extend(f"    {line}" for line in amcheck["output"].splitlines()[:20])
    if data["checks"]:
        lines.append("  checks")
    for check in data["checks"]:
        got = check["error"] or ("no row" if check["got"] is None else repr(check["got"]))
        lines.append(f"    {check['name']:<24} {'ok' if check['ok'] else 'FAILED':<6} "
                     f"expected {check['expect']!r}, got {got}")
    if data["failures"]:
        lines.append("  failures")
        lines.extend(f"    - {failure.splitlines()[0]}" for failure in data["failures"])
    lines.append(f"  cleanup       {'scratch instance stopped and removed' if data['cleaned_up'] else 'INCOMPLETE'}"
                 + (f" ({data['scratch_dir']})" if data["scratch_dir"] else ""))
    lines.append(f"  stored as     {data['report_key'] or 'NOT STORED'}")
    return "\n".join(lines)
