"""The command line: parse, call one core function, render text or --json. No logic lives here.

Heavy modules are imported inside the commands: wal-push and wal-fetch run once per WAL segment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pgvault import __version__
from pgvault.errors import ObjectNotFound, PgvaultError, RepositoryError
from pgvault.units import format_size

if TYPE_CHECKING:
    from pgvault.config import Policy
    from pgvault.repo.base import Storage

# wal-fetch: PostgreSQL ends recovery at the first "not found" (exit 1). Any other failure must stop
# recovery instead of silently ending it early at the wrong point: exit codes above 125 make
# PostgreSQL abort recovery rather than treat the file as missing.
WAL_FETCH_ERROR_EXIT = 255


@dataclass
class Context:
    config: str | None
    debug: bool
    quiet: bool

    def policy_path(self) -> Path:
        from pgvault.config import resolve_config_path

        return resolve_config_path(self.config)

    def policy(self) -> Policy:
        from pgvault.config import load_policy

        return load_policy(self.policy_path())

    def storage(self, policy: Policy) -> Storage:
        from pgvault.repo import open_storage

        return open_storage(policy.repository)

    def progress(self, message: str) -> None:
        if not self.quiet:
            stamp = datetime.now().strftime("%H:%M:%S")
            click.echo(f"{stamp} {message}", err=True)


pass_context = click.make_pass_decorator(Context)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class Parsed(click.ParamType):
    """A flag value parsed by a core function; its ValueError becomes click's one-line usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # already converted (a default, or a caller passing the real type)
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# Parsers import their modules on first use: wal-push and wal-fetch never pay for them.
def _target_time(text: str) -> datetime:
    from pgvault.targets import parse_target_time

    return parse_target_time(text)


def _lsn(text: str) -> Any:
    from pgvault.pg.wal import Lsn

    return Lsn.parse(text)


def _timeline(text: str) -> Any:
    from pgvault.targets import parse_timeline

    return parse_timeline(text)


def _xid(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 3:
        raise ValueError(f"{text!r} is not a transaction id; give a number of 3 or more, as txid_current() returns it")
    return int(text)


def _tablespace_mapping(text: str) -> tuple[str, Path]:
    key, sep, directory = text.partition("=")
    if not sep or not key.strip() or not directory.startswith("/"):
        raise ValueError(f"{text!r} is not NAME=/absolute/dir; write e.g. --tablespace-map ts1=/srv/pg/ts1")
    return key.strip(), Path(directory)


def _annotation(text: str) -> tuple[str, str]:
    key, sep, val = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE; write e.g. --annotate reason=pre-upgrade")
    return key.strip(), val


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config", metavar="FILE", envvar="PGVAULT_CONFIG",
              help="Policy file (YAML). Default: $PGVAULT_CONFIG.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.version_option(__version__, prog_name="pgvault")
@click.pass_context
def cli(ctx: click.Context, config: str | None, debug: bool, quiet: bool) -> None:
    """Backup and point-in-time recovery for PostgreSQL.

    Example: pgvault --config /etc/pgvault/demo.yaml backup
    """
    ctx.obj = Context(config=config, debug=debug, quiet=quiet)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def init(ctx: Context, as_json: bool) -> None:
    """Bind the repository to this cluster: check the server and write cluster.json.

    Idempotent; refuses a repository whose cluster belongs to another database system.

    Example: pgvault --config /etc/pgvault/demo.yaml init
    """
    from pgvault.cluster import init_cluster

    policy = ctx.policy()
    info, created, warnings = init_cluster(policy, ctx.storage(policy))
    if as_json:
        _emit_json({"created": created, "cluster": info.model_dump(mode="json"), "warnings": warnings})
        return
    state = "initialized" if created else "already initialized"
    click.echo(f"cluster {info.cluster} {state}: system {info.system_id}, PostgreSQL {_pg_version(info.pg_version)}, "
               f"repository {policy.repository.url}")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def check(ctx: Context, as_json: bool) -> None:
    """Check connection, settings and repository, then prove archiving with a WAL switch.

    Example: pgvault --config /etc/pgvault/demo.yaml check
    """
    from pgvault.cluster import check_cluster

    policy = ctx.policy()
    report = check_cluster(policy, ctx.storage(policy))
    if as_json:
        _emit_json(report.as_dict())
        return
    for what, result in report.checks:
        click.echo(f"{what:<20} {result}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("check passed")


@cli.command("wal-push")
@click.argument("path", type=click.Path(path_type=Path))
@pass_context
def wal_push(ctx: Context, path: Path) -> None:
    """Archive one WAL file (PostgreSQL's archive_command).

    Example: archive_command = 'pgvault --config /etc/pgvault/demo.yaml wal-push %p'
    """
    from pgvault import archive, push_ahead
    from pgvault.catalog import Catalog
    from pgvault.spool import push_spool

    policy_path = ctx.policy_path()
    # Digest before load: a marker must never stand for a repository the policy did not name.
    try:
        policy_sha256 = push_ahead.policy_digest(policy_path)
    except OSError:
        policy_sha256 = ""  # load_policy says what is wrong with the file
    policy = ctx.policy()
    storage = ctx.storage(policy)
    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    # This call decides afresh; a marker of this segment (the fast path did not trust it) goes.
    push_ahead.forget(str(push_spool(policy_path)), path.name)
    archive.push(storage, catalog.layout, path, system_id=info.system_id,
                 segment_size=info.wal_segment_size, level=policy.archive.compression_level)
    # Only now, with `path` durable: the look-ahead, which never fails this call (details under --debug).
    if policy.archive.background and policy.archive.look_ahead > 0:
        from pgvault.pusher import ensure_pusher

        try:
            if ensure_pusher(policy_path, path.parent, path.name):
                return
        except OSError as exc:  # no pusher: look ahead inline, as without archive.background
            if ctx.debug:
                click.echo(f"debug: background pusher not started: {exc}", err=True)
    push_ahead.push_ahead(storage, catalog.layout, path, policy_path=policy_path, policy_sha256=policy_sha256,
                          system_id=info.system_id, segment_size=info.wal_segment_size,
                          level=policy.archive.compression_level, limit=policy.archive.look_ahead,
                          parallel=policy.archive.push_parallel,
                          report=(lambda line: click.echo(f"debug: {_redact(line)}", err=True)) if ctx.debug
                          else (lambda line: None))


@cli.command("wal-pusher", hidden=True)
@click.option("--wal-dir", type=click.Path(path_type=Path), required=True, help="The pg_wal directory to serve.")
@click.option("--skip", default="", help="A segment the starting call pushed itself.")
@pass_context
def wal_pusher(ctx: Context, wal_dir: Path, skip: str) -> None:
    """Internal: the background pusher of archive.background, started by wal-push.

    Example: pgvault --config /etc/pgvault/demo.yaml wal-pusher --wal-dir /var/lib/postgresql/15/main/pg_wal
    """
    from pgvault.pusher import run_pusher

    run_pusher(ctx.policy_path(), wal_dir.absolute(), skip)


@cli.command("wal-fetch")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@pass_context
def wal_fetch(ctx: Context, name: str, dest: Path) -> None:
    """Restore one WAL file (PostgreSQL's restore_command).

    Exits 1, silently, when the file is not in the repository (PostgreSQL's "end of archive");
    exits 255 on any other failure so recovery stops instead of ending early. During a recovery
    (run in the data directory) it also keeps a worker fetching the next segments ahead
    (restore.prefetch); the next calls take them from its spool, checked against their SHA-256.

    Example: restore_command = 'pgvault --config /etc/pgvault/demo.yaml wal-fetch %f %p'
    """
    from pgvault import archive
    from pgvault.repo.layout import Layout

    try:
        policy = ctx.policy()
        storage = ctx.storage(policy)
        layout = Layout(policy.cluster)
        try:
            archive.fetch(storage, layout, name, dest)
        except ObjectNotFound:
            # Only an intact repository may answer "not archived": an unmounted or emptied one must
            # stop recovery, not end it early.
            if storage.head(layout.cluster_json) is None:
                raise RepositoryError(f"repository {policy.repository.url} has no cluster {policy.cluster!r} "
                                      "(not mounted, or the wrong repository?)",
                                      hint="fix the repository, then start PostgreSQL again") from None
            raise
    except ObjectNotFound:
        sys.exit(1)
    except PgvaultError as exc:
        _report(exc, ctx.debug)
        sys.exit(WAL_FETCH_ERROR_EXIT)
    except Exception as exc:  # a full disk, a permission problem: never "end of archive"
        _report(PgvaultError(f"cannot restore {name} to {dest}: {exc}"), ctx.debug)
        sys.exit(WAL_FETCH_ERROR_EXIT)
    if policy.restore.prefetch > 0:
        try:
            from pgvault.prefetch import after_full_fetch

            after_full_fetch(ctx.policy_path(), Path.cwd(), name)
        except Exception as exc:  # prefetch only saves time: the segment is in place, so this call succeeded
            click.echo(f"warning: wal-fetch prefetch not started: {exc}", err=True)


@cli.command("wal-prefetch", hidden=True)
@click.option("--worker", "mode", flag_value="worker", help="Run the prefetch worker of --pgdata's spool.")
@click.option("--clean", "mode", flag_value="clean", help="Stop the worker and remove the spool.")
@click.option("--pgdata", type=click.Path(path_type=Path), default=None,
              help="The data directory in recovery (default: the working directory, as PostgreSQL runs it).")
@pass_context
def wal_prefetch(ctx: Context, mode: str | None, pgdata: Path | None) -> None:
    """Internal: wal-fetch's prefetch worker, and the removal of its spool when recovery ends.

    wal-fetch starts the worker itself; restore sets recovery_end_command to the --clean call, which
    prints what the spool did to the server log.

    Example: recovery_end_command = 'pgvault --config /etc/pgvault/demo.yaml wal-prefetch --clean'
    """
    from pgvault import prefetch

    if mode is None:
        raise click.UsageError("give --worker or --clean")
    where = (pgdata or Path.cwd()).absolute()
    if mode == "worker":
        prefetch.run_worker(ctx.policy_path(), where)
        return
    ctx.policy()  # a policy file that is missing or invalid is named, as for any command
    try:
        report = prefetch.clean_spool(ctx.policy_path(), where)
    except OSError as exc:
        raise PgvaultError(f"cannot remove the wal-fetch prefetch spool: {exc}") from None
    if report is not None and not ctx.quiet:
        for line in prefetch.report_lines(report):
            click.echo(line, err=True)


@cli.command()
@click.option("--annotate", "annotations", type=Parsed("KEY=VALUE", _annotation), multiple=True,
              help="Attach KEY=VALUE to the backup record (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the backup record as JSON.")
@pass_context
def backup(ctx: Context, annotations: tuple[tuple[str, str], ...], as_json: bool) -> None:
    """Take a full backup; print its id.

    Example: pgvault --config /etc/pgvault/demo.yaml backup --annotate reason=nightly
    """
    from pgvault.backup import run_backup
    from pgvault.progress import Display

    policy = ctx.policy()
    with Display.for_stderr(quiet=ctx.quiet) as display:
        record = run_backup(policy, ctx.storage(policy), annotations=dict(annotations), progress=display)
    if as_json:
        _emit_json(record.model_dump(mode="json"))
    else:
        click.echo(record.id)


def _pg_version(num: int) -> str:
    """150018 -> 15.18, as PostgreSQL prints it."""
    return f"{num // 10000}.{num % 10000}"


def _waldump(bindir: Path | None, pg_version: int) -> str:
    from pgvault.pg.waldump import waldump_path

    return waldump_path(bindir, pg_version)


def _backup_row(b: Any, pins: set[str]) -> dict[str, Any]:
    return {
        "id": b.id, "status": "ok", "start_time": b.start_time.isoformat(), "stop_time": b.stop_time.isoformat(),
        "start_lsn": b.start_lsn, "stop_lsn": b.stop_lsn, "timeline": b.timeline, "raw_size": b.raw_size,
        "stored_size": b.stored_size, "duration_s": b.duration_s, "annotations": b.annotations,
        "pinned": b.id in pins,
    }


def _render_windows(windows: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="recoverable window", title_justify="left")
    for column in ("timeline", "earliest (consistent)", "latest (last commit)", "WAL through"):
        table.add_column(column)
    for w in windows:
        earliest = f"{w.earliest_time:%Y-%m-%d %H:%M:%S%z} ({w.earliest_lsn})" if w.earliest_time else "-"
        latest = (f"{w.latest_time:%Y-%m-%d %H:%M:%S.%f%z} ({w.latest_lsn})" if w.latest_time
                  else f"LSN {w.latest_lsn}" if w.latest_lsn else "-")
        table.add_row(str(w.timeline), earliest, latest, w.wal_end or "-")
    Console(width=140).print(table)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print backups and windows as JSON.")
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List backups and the recoverable window of each timeline.

    Example: pgvault --config /etc/pgvault/demo.yaml list --json
    """
    from pgvault.recoverable import Recoverable

    policy = ctx.policy()
    storage = ctx.storage(policy)
    from pgvault.catalog import Catalog

    catalog = Catalog(storage, policy.cluster)
    info = catalog.require_cluster_info()
    view = Recoverable(storage, policy.cluster, _waldump(policy.postgres.bindir, info.pg_version))
    windows = [view.window(t) for t in view.timelines()]
    pins = catalog.pinned_ids()
    if as_json:
        _emit_json({"backups": [_backup_row(b, pins) for b in view.backups],
                    "windows": [w.as_dict() for w in windows]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"backups of cluster {policy.cluster}", title_justify="left")
    for column in ("id", "status", "start", "stop", "stop LSN", "TL", "raw", "stored", "took", "pinned",
                   "annotations"):
        table.add_column(column)
    for b in view.backups:
        table.add_row(b.id, "ok", f"{b.start_time:%Y-%m-%d %H:%M:%S}", f"{b.stop_time:%Y-%m-%d %H:%M:%S}",
                      b.stop_lsn, str(b.timeline), format_size(b.raw_size), format_size(b.stored_size),
                      f"{b.duration_s:.1f}s", "yes" if b.id in pins else "",
                      ", ".join(f"{k}={v}" for k, v in b.annotations.items()))
    Console(width=160).print(table)
    _render_windows(windows)


@cli.command()
@click.argument("backup_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_context
def info(ctx: Context, backup_id: str | None, as_json: bool) -> None:
    """Show one backup in full, or the repository: cluster, backups and recoverable windows.

    Example: pgvault --config /etc/pgvault/demo.yaml info 20261126T020000Z
    """
    from pgvault.catalog import Catalog

    policy = ctx.policy()
    storage = ctx.storage(policy)
    catalog = Catalog(storage, policy.cluster)
    cluster = catalog.require_cluster_info()
    if backup_id is not None:
        record = catalog.backup(backup_id)
        if record is None:
            raise RepositoryError(f"no backup {backup_id!r} in this repository",
                                  hint="pgvault list shows backup ids")
        data = record.model_dump(mode="json")
        pinned = backup_id in catalog.pinned_ids()
        if as_json:
            _emit_json({**data, "pinned": pinned})  # "pinned" is the repository's, not backup.json's
            return
        data["annotations"] = ", ".join(f"{k}={v}" for k, v in record.annotations.items()) or "-"
        data["pg_version"] = _pg_version(record.pg_version)
        for key in ("id", "timeline", "pg_version", "start_time", "stop_time", "start_lsn", "stop_lsn",
                    "checkpoint_lsn", "start_wal", "stop_wal", "next_xid", "raw_size", "stored_size", "duration_s",
                    "annotations", "pgvault_version"):
            click.echo(f"{key:<16} {data[key]}")
        click.echo(f"{'pinned':<16} {'yes' if pinned else 'no'}")
        for space in record.tablespaces:
            click.echo(f"{'tablespace':<16} {space.name} (OID {space.oid}) at {space.location}")
        click.echo(f"{'parts':<16} {len(record.parts)}")
        for part in record.parts:
            where = f"  tablespace {part.tablespace}" if part.tablespace else ""
            click.echo(f"  {part.key}  {part.raw_size} raw  {part.size} stored  sha256 {part.sha256}{where}")
        return
    from pgvault.recoverable import Recoverable

    view = Recoverable(storage, policy.cluster, _waldump(policy.postgres.bindir, cluster.pg_version))
    windows = [view.window(t) for t in view.timelines()]
    pins = catalog.pinned_ids()
    if as_json:
        _emit_json({"cluster": cluster.model_dump(mode="json"), "repository": policy.repository.url,
                    "backups": [_backup_row(b, pins) for b in view.backups],
                    "windows": [w.as_dict() for w in windows]})
        return
    click.echo(f"cluster      {cluster.cluster} (system {cluster.system_id}, "
               f"PostgreSQL {_pg_version(cluster.pg_version)})")
    click.echo(f"repository   {policy.repository.url}")
    click.echo(f"backups      {len(view.backups)}"
               + (f" (newest {view.backups[-1].id})" if view.backups else ""))
    _render_windows(windows)


@cli.command()
@click.option("--pgdata", type=click.Path(path_type=Path, file_okay=False),
              help="Data directory to restore into (empty unless --delta/--force). Default: postgres.pgdata.")
@click.option("--backup", "backup_id", metavar="ID", help="Restore this backup (default: newest before the target).")
@click.option("--target-time", type=Parsed("TIME", _target_time), help="Recover up to this moment (with a time zone).")
@click.option("--target-lsn", type=Parsed("LSN", _lsn), help="Recover up to this WAL location, e.g. 0/3000028.")
@click.option("--target-xid", type=Parsed("XID", _xid), help="Recover up to this transaction's commit.")
@click.option("--target-name", help="Recover up to this restore point (pg_create_restore_point).")
@click.option("--target", "target_immediate", type=click.Choice(["immediate"]),
              help="immediate: stop as soon as the backup is consistent.")
@click.option("--target-action", type=click.Choice(["promote", "pause", "shutdown"]), default="promote",
              show_default=True, help="What PostgreSQL does on reaching the target.")
@click.option("--target-timeline", type=Parsed("current|latest|N", _timeline), default="latest", show_default=True,
              help="Timeline to follow: current, latest or a number.")
@click.option("--target-exclusive", is_flag=True, help="Stop just before the target instead of just after.")
@click.option("--archive-mode", type=click.Choice(["preserve", "off"]), default="preserve", show_default=True,
              help="off: the restored server does not archive (scratch copies, drills).")
@click.option("--tablespace-map", "tablespace_map", type=Parsed("NAME=DIR", _tablespace_mapping), multiple=True,
              help="Restore tablespace NAME (or OID) into DIR instead of its original place (repeatable).")
@click.option("--dry-run", is_flag=True,
              help="Check everything (directory, target, every part's checksum) and show the plan; write nothing.")
@click.option("--delta", is_flag=True, help="Reuse files in --pgdata that match the backup; remove the rest.")
@click.option("--force", is_flag=True, help="Delete everything in --pgdata first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def restore(ctx: Context, pgdata: Path, backup_id: str | None, target_time: datetime | None, target_lsn: Any,
            target_xid: int | None, target_name: str | None, target_immediate: str | None, target_action: str,
            target_timeline: Any, target_exclusive: bool, archive_mode: str,
            tablespace_map: tuple[tuple[str, Path], ...], dry_run: bool, delta: bool, force: bool,
            as_json: bool) -> None:
    """Restore a backup into --pgdata and set it up to recover to a target.

    Without a target, recovery replays all archived WAL. Afterwards `pg_ctl -D DIR start`
    recovers to the target and (by default) promotes.

    Example: pgvault restore --pgdata /var/lib/postgresql/15/main --target-time '2026-11-20 14:30:00+00'
    """
    from pgvault.errors import UsageError
    from pgvault.restore import RestoreRequest
    from pgvault.restore import restore as run_restore
    from pgvault.targets import make_target

    if delta and force:
        raise UsageError("give --delta or --force, not both",
                         hint="--delta keeps matching files, --force deletes everything first")
    target = make_target(time=target_time, lsn=target_lsn, xid=target_xid, name=target_name,
                         immediate=target_immediate == "immediate", inclusive=not target_exclusive,
                         action=target_action, timeline=target_timeline)
    policy = ctx.policy()
    pgdata = pgdata or policy.postgres.pgdata
    if pgdata is None:
        raise UsageError("--pgdata is required (the policy sets no postgres.pgdata)",
                         hint="pass --pgdata DIR, the directory to restore into")
    storage = ctx.storage(policy)
    from pgvault.catalog import Catalog

    cluster = Catalog(storage, policy.cluster).require_cluster_info()
    request = RestoreRequest(pgdata=pgdata, target=target, backup_id=backup_id,
                             archive_mode=archive_mode,  # type: ignore[arg-type]
                             mode="delta" if delta else "force" if force else "new",
                             config_path=ctx.policy_path(), tablespace_map=dict(tablespace_map),
                             dry_run=dry_run)
    from pgvault.progress import Display

    with Display.for_stderr(quiet=ctx.quiet) as display:
        result = run_restore(storage, policy, request,
                             waldump=_waldump(policy.postgres.bindir, cluster.pg_version), progress=display)
    if as_json:
        _emit_json(result.as_dict())
        return
    if result.dry_run:
        click.echo(f"dry run: would restore backup {result.backup_id} into {result.pgdata} "
                   f"(timeline {result.timeline}); every check passed, nothing was written")
        for oid, directory in result.tablespaces.items():
            click.echo(f"  tablespace {oid} -> {directory}")
        for name, value in result.settings.items():
            click.echo(f"  {name} = {value!r}")
        return
    click.echo(f"restored backup {result.backup_id} into {result.pgdata} ({result.files_written} files written, "
               f"{result.files_unchanged} unchanged, {result.duration_s:.1f}s)")
    click.echo(f"recovery target: {result.target}; start it with: pg_ctl -D {result.pgdata} start")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo's directories (prints where).")
@pass_context
def demo(ctx: Context, keep: bool) -> None:
    """Run the whole job on a throwaway PostgreSQL: archive, back up, write, restore to a moment, compare.

    Needs only the PostgreSQL 15 server binaries; cleans up after itself (also on Ctrl-C).

    Example: pgvault demo
    """
    import os

    from pgvault.demo import reexec_as_db_user, run_demo

    if os.geteuid() == 0:
        sys.exit(reexec_as_db_user(keep=keep, quiet=ctx.quiet, debug=ctx.debug))
    report = run_demo(progress=ctx.progress, keep=keep)
    click.echo(report.render())
    if not report.ok:
        sys.exit(1)


def _redact(text: str) -> str:
    from pgvault.redaction import redact

    return redact(text)


def _report(exc: PgvaultError, debug: bool) -> None:
    from pgvault.redaction import redact

    click.echo(f"error: {redact(exc.message)}", err=True)
    if exc.hint:
        click.echo(f"hint: {redact(exc.hint)}", err=True)
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


# The operations commands live beside this module, one per concept, and register on `cli` when
# imported. They import their core modules inside the commands, as the ones above do.
from pgvault import cli_drill, cli_ha, cli_metrics, cli_retention, cli_schedule, cli_verify  # noqa: E402, F401


def main() -> NoReturn:
    debug = "--debug" in sys.argv[1:]
    try:
        result = cli.main(standalone_mode=False)
    except PgvaultError as exc:
        _report(exc, debug)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click's name for Ctrl-C
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "pgvault"
        click.echo(f"error: {_redact(exc.format_message())}", err=True)
        click.echo(f"hint: see '{command} --help'", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {_redact(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly, details under --debug
        if debug:
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {_redact(str(exc))} (rerun with --debug for details)",
                   err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
