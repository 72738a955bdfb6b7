"""verify: the integrity command."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from pgvault.cli import Context, _emit_json, cli, pass_context

if TYPE_CHECKING:
    from pgvault.verify import VerifyReport


@cli.command()
@click.argument("backup_id", metavar="[ID]", required=False)
@click.option("--deep", is_flag=True,
              help="Also decompress every backup and check each file against PostgreSQL's backup_manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_context
def verify(ctx: Context, backup_id: str | None, deep: bool, as_json: bool) -> None:
    """Check every object's size and SHA-256 by reading it, and the WAL's continuity; exit 1 on any problem.

    With ID, only that backup and the WAL it needs. The report is also stored in the repository.

    Example: pgvault --config /etc/pgvault/main.yaml verify --deep
    """
    from pgvault.errors import IntegrityError
    from pgvault.progress import Display
    from pgvault.verify import run_verify

    policy = ctx.policy()
    with Display.for_stderr(quiet=ctx.quiet) as display:
        report = run_verify(policy, ctx.storage(policy), backup_id=backup_id, deep=deep, progress=display)
    if as_json:
        _emit_json(report.as_dict())
    else:
        _render(report)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not report.ok:
        first = report.problems[0]
        raise IntegrityError(f"verify found {len(report.problems)} problem(s); the first: {first}",
                             hint=f"the report is stored as {report.report_key}" if report.report_key
                             else "run pgvault verify --json for the whole report")


def _render(report: VerifyReport) -> None:
    from pgvault.units import format_size as _size

    checked = report.checked
    scope = f"backup {report.backup_id} and the WAL it needs" if report.backup_id else "everything"
    click.echo(f"verify {report.id} of cluster {report.cluster} ({scope}{', deep' if report.deep else ''})")
    click.echo(f"  read {checked.get('backups', 0)} backup(s): {checked.get('parts', 0)} part(s), "
               f"{checked.get('manifests', 0)} manifest(s); {checked.get('wal_segments', 0)} WAL segment(s), "
               f"{checked.get('wal_history', 0)} history and {checked.get('wal_other', 0)} other WAL file(s); "
               f"{_size(checked.get('bytes', 0))} in {checked.get('duration_ms', 0) / 1000:.1f}s")
    if report.deep:
        click.echo(f"  compared {checked.get('files', 0)} file(s), {_size(checked.get('file_bytes', 0))}, "
                   "with PostgreSQL's backup manifests")
    for backup in report.backups:
        state = "ok" if backup["ok"] else f"{backup['problems']} problem(s)" if backup["problems"] else "not usable"
        click.echo(f"  backup {backup['id']}: {state}")
    for gap in report.gaps:
        span = gap.first.name if gap.segments == 1 else f"{gap.first.name}..{gap.last.name}"
        click.echo(f"  WAL gap: {span} ({gap.segments} segment(s)), timeline(s) "
                   f"{', '.join(str(t) for t in gap.timelines)}")
    if report.windows:
        click.echo("  recoverable windows (from a backup's consistency point to the end of its unbroken WAL):")
        for w in report.windows:
            click.echo(f"    timeline {w.timeline}: {w.earliest_time:%Y-%m-%d %H:%M:%S%z} ({w.earliest_lsn}) "
                       f"through WAL {w.wal_end.name} (before {w.wal_end.end_lsn}); backups {', '.join(w.backups)}")
    else:
        click.echo("  recoverable windows: none")
    for problem in report.problems:
        click.echo(f"  problem ({problem.kind}): {problem}")
    click.echo("OK: every check passed" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
