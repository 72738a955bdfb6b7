"""stack, patroni-bootstrap, patroni-replica, ha restore: pgvault in the Patroni HA stack."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pgvault.cli import Context, Parsed, _emit_json, _lsn, _target_time, _timeline, _xid, cli, pass_context
from pgvault.errors import UsageError

DEFAULT_SCOPE = "yieldsensei"


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The recovery target flags of `restore`, for the commands that restore a cluster."""
    options = [
        click.option("--backup", "backup_id", metavar="ID",
                     help="Restore this backup (default: newest before the target)."),
        click.option("--target-time", type=Parsed("TIME", _target_time),
                     help="Recover up to this moment (with a time zone)."),
        click.option("--target-lsn", type=Parsed("LSN", _lsn), help="Recover up to this WAL location."),
        click.option("--target-xid", type=Parsed("XID", _xid), help="Recover up to this transaction's commit."),
        click.option("--target-name", help="Recover up to this restore point."),
        click.option("--target", "target_immediate", type=click.Choice(["immediate"]),
                     help="immediate: stop as soon as the backup is consistent."),
        click.option("--target-timeline", type=Parsed("current|latest|N", _timeline), default="latest",
                     show_default=True, help="Timeline to follow."),
        click.option("--target-exclusive", type=click.BOOL, default=False, is_flag=False, flag_value=True,
                     help="Stop just before the target instead of just after."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _make_target(kw: dict[str, Any]) -> Any:
    from pgvault.targets import make_target

    return make_target(time=kw["target_time"], lsn=kw["target_lsn"], xid=kw["target_xid"], name=kw["target_name"],
                       immediate=kw["target_immediate"] == "immediate", inclusive=not kw["target_exclusive"],
                       action="promote", timeline=kw["target_timeline"])


# ---- Patroni's hooks -----------------------------------------------------------------------------------

@cli.command("patroni-bootstrap")
@click.option("--scope", required=True, help="Patroni's scope (passed by Patroni).")
@click.option("--datadir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The data directory to create (passed by Patroni).")
@target_options
@pass_context
def patroni_bootstrap(ctx: Context, scope: str, datadir: Path, **kw: Any) -> None:
    """Patroni's custom bootstrap method: a new cluster from the repository, at a target.

    Restores the newest backup before the target into --datadir, recovers and promotes it on a
    private socket (archiving on, so the new timeline reaches the repository), stops it cleanly
    and leaves a primary for Patroni to start. In patroni.yml: bootstrap.method: pgvault, with
    bootstrap.pgvault.command: pgvault --config FILE patroni-bootstrap, and the target as extra
    keys (target-time: '...'), which Patroni passes as --target-time=... .

    Example: pgvault --config /etc/pgvault/pgvault.yml patroni-bootstrap --scope yieldsensei
    --datadir /data/pg --target-time '2026-11-20 14:30:00+00'
    """
    from pgvault.ha.bootstrap import run_patroni_bootstrap

    policy = ctx.policy()
    target = _make_target(kw)
    if scope != policy.cluster:
        ctx.progress(f"patroni-bootstrap: Patroni scope {scope!r}, pgvault cluster {policy.cluster!r}")
    result = run_patroni_bootstrap(policy, ctx.storage(policy), ctx.policy_path(), datadir, target,
                                   backup_id=kw["backup_id"], progress=ctx.progress)
    click.echo(f"bootstrapped {datadir} from backup {result.backup_id} ({result.target}): timeline "
               f"{result.timeline}, {result.duration_s:.1f} s")


@cli.command("patroni-replica")
@click.option("--scope", help="Patroni's scope (passed by Patroni).")
@click.option("--datadir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The data directory to create (passed by Patroni).")
@click.option("--role", default="replica", help="Passed by Patroni; only replica is meaningful.")
@click.option("--connstring", default="", help="The leader, as Patroni passes it (password from PGPASSFILE).")
# Patroni passes the method's own options on too; they mean nothing here.
@click.option("--no_leader", "_no_leader", hidden=True)
@click.option("--keep_data", "_keep_data", hidden=True)
@pass_context
def patroni_replica(ctx: Context, scope: str | None, datadir: Path, role: str, connstring: str,
                    _no_leader: str | None, _keep_data: str | None) -> None:
    """Patroni's replica creation method: a standby restored from the repository.

    Restores the newest backup on the leader's timeline into --datadir and leaves a standby for
    Patroni to configure; replays archived WAL, then streams. Exits 1 when the repository cannot
    give one (no backup yet, the leader's timeline not archived yet): list it before basebackup in
    create_replica_methods and Patroni falls back.

    Example: pgvault --config /etc/pgvault/pgvault.yml patroni-replica --datadir /data/pg
    --connstring 'host=pg1 port=5432 user=replicator'
    """
    from pgvault.ha.bootstrap import run_patroni_replica

    policy = ctx.policy()
    backup_id = run_patroni_replica(policy, ctx.storage(policy), ctx.policy_path(), datadir, connstring or None,
                                    progress=ctx.progress)
    click.echo(f"replica {datadir} restored from backup {backup_id}")


# ---- the stack -----------------------------------------------------------------------------------------

def _default_runtime() -> str:
    """compose where a docker engine answers, else local (a docker CLI without an engine is common)."""
    import subprocess

    docker = shutil.which("docker")
    if docker is None:
        return "local"
    try:
        answered = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                  timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answered = False
    return "compose" if answered else "local"


def _scope_and_policy(ctx: Context) -> tuple[str, Path | None]:
    """The scope is the policy's cluster; without a policy, the built-in default (a repository in the
    stack directory)."""
    if ctx.config is None:
        return DEFAULT_SCOPE, None
    path = ctx.policy_path()
    return ctx.policy().cluster, path


def _local(ctx: Context, directory: Path | None) -> Any:
    from pgvault.ha.stack import LocalStack, default_stack_dir

    scope, _ = _scope_and_policy(ctx)
    return LocalStack(directory or default_stack_dir(scope), scope, progress=ctx.progress)


def _compose(compose_dir: Path | None) -> Any:
    from pgvault.ha.compose import ComposeRuntime

    directory = compose_dir or Path("compose")
    if not (directory / "docker-compose.yml").is_file():
        raise UsageError(f"no docker-compose.yml in {directory}",
                         hint="pass --compose-dir, the compose/ directory of a pgvault checkout")
    return ComposeRuntime(directory)


def stack_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--runtime", type=click.Choice(["local", "compose"]), default=None,
                     help="local: processes on 127.0.0.1; compose: docker compose. Default: compose where "
                     "a docker engine answers, else local."),
        click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
                     help="Local runtime: the stack directory. Default: $PGVAULT_STACK_DIR or "
                     "/var/tmp/pgvault-stack-SCOPE."),
        click.option("--compose-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="Compose runtime: the directory with docker-compose.yml. Default: ./compose."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        func = option(func)
    return func


@cli.group()
def stack() -> None:
    """Run the HA stack: 3 etcd, 3 Patroni/PostgreSQL 15 nodes, HAProxy, PgBouncer.

    Example: pgvault --config /etc/pgvault/pgvault.yml stack up --runtime local
    """


@stack.command("up")
@stack_options
@click.option("--timeout", type=click.IntRange(10, 3600), default=180, show_default=True,
              help="Seconds to wait for a leader and two streaming replicas.")
@pass_context
def stack_up(ctx: Context, runtime: str | None, directory: Path | None, compose_dir: Path | None, as_json: bool,
             timeout: int) -> None:
    """Start the stack and wait for a leader, two streaming replicas and working endpoints.

    The local runtime runs the compose deployment's config templates as processes of the postgres
    OS user on free ports of 127.0.0.1; archive_command and restore_command are pgvault with each
    node's policy (the given policy, else a repository in the stack directory). Idempotent.

    Example: pgvault --config /etc/pgvault/pgvault.yml stack up --runtime local
    """
    if (runtime or _default_runtime()) == "compose":
        data = _compose(compose_dir).up(timeout)
    else:
        _, policy_path = _scope_and_policy(ctx)
        data = _local(ctx, directory).up(policy_path, timeout)
    _show(data, as_json)


@stack.command("down")
@stack_options
@click.option("--purge", is_flag=True, help="Local runtime: also delete the stack directory (data, passwords).")
@pass_context
def stack_down(ctx: Context, runtime: str | None, directory: Path | None, compose_dir: Path | None, as_json: bool,
               purge: bool) -> None:
    """Stop exactly the processes `stack up` started (data kept unless --purge).

    Example: pgvault stack down --runtime local
    """
    if (runtime or _default_runtime()) == "compose":
        data = _compose(compose_dir).down()
    else:
        local = _local(ctx, directory)
        data = local.down() if local.state() is not None else {"runtime": "local", "stopped": []}
        if purge:
            local.purge()
            data["purged"] = str(local.root)
    if as_json:
        _emit_json(data)
    else:
        click.echo("stopped: " + (", ".join(data.get("stopped", [])) or "nothing was running"))


@stack.command("status")
@stack_options
@pass_context
def stack_status(ctx: Context, runtime: str | None, directory: Path | None, compose_dir: Path | None,
                 as_json: bool) -> None:
    """Members, roles, timelines, lag and endpoints of the stack.

    Example: pgvault stack status --json
    """
    if (runtime or _default_runtime()) == "compose":
        data = _compose(compose_dir).status()
    else:
        data = _local(ctx, directory).status()
    _show(data, as_json)


@stack.command("render", hidden=True)
@click.argument("template")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write here instead of stdout.")
def stack_render(template: str, out: Path | None) -> None:
    """Render one stack template from the environment (the node image's entrypoint)."""
    from pgvault.ha.render import render, write_rendered

    if out is None:
        click.echo(render(template, os.environ), nl=False)
    else:
        write_rendered(template, os.environ, out)


def _show(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit_json(data)
        return
    members = data.get("members")
    if members is not None:
        click.echo(f"{'member':<8} {'role':<10} {'state':<12} {'timeline':>8} {'lag':>10}")
        for m in members:
            lag = "" if m.get("lag") in (None, "") else str(m["lag"])
            click.echo(f"{m.get('name', ''):<8} {m.get('role', ''):<10} {m.get('state', ''):<12} "
                       f"{m.get('timeline') or '':>8} {lag:>10}")
    for service in data.get("services", []):
        click.echo(f"{service.get('name', ''):<24} {service.get('state', ''):<10} {service.get('health') or ''}")
    endpoints = data.get("endpoints", {})
    for name in ("write", "read", "pgbouncer", "haproxy_stats", "metrics"):
        if name in endpoints:
            click.echo(f"{name + ':':<15} {endpoints[name]}")
    patroni = endpoints.get("patroni")
    if patroni:
        urls = patroni.values() if isinstance(patroni, dict) else patroni
        click.echo(f"{'patroni:':<15} {' '.join(urls)}")
    if "passwords" in endpoints:
        click.echo(f"{'passwords:':<15} {endpoints['passwords']} (user postgres)")


# ---- cluster PITR --------------------------------------------------------------------------------------

@cli.group()
def ha() -> None:
    """Operations on the whole Patroni cluster.

    Example: pgvault --config /etc/pgvault/pgvault.yml ha restore --target-time '2026-11-20 14:30:00+00'
    """


@ha.command("restore")
@target_options
@click.option("--member", help="The node to bootstrap from the repository. Default: the current leader.")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="The local stack's directory. Default: $PGVAULT_STACK_DIR or /var/tmp/pgvault-stack-SCOPE.")
@click.option("--timeout", type=click.IntRange(10, 86400), default=3600, show_default=True,
              help="Seconds to wait for each of the bootstrap and the replicas.")
@click.option("--yes", is_flag=True, help="Do not ask; run the plan.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def ha_restore(ctx: Context, member: str | None, directory: Path | None, timeout: int, yes: bool, as_json: bool,
               **kw: Any) -> None:
    """Rewind the whole cluster to a target through Patroni (point-in-time recovery of the cluster).

    Stops Patroni everywhere, removes the cluster from the DCS, moves the data aside (kept until
    success), bootstraps one node from the repository to the target, waits for writes through
    HAProxy and PgBouncer, rebuilds the replicas, confirms the new timeline's history file is in
    the repository and takes a fresh full backup. Shows the plan and asks unless --yes.

    Example: pgvault --config /etc/pgvault/pgvault.yml ha restore --target-time '2026-11-20 14:30:00+00'
    """
    from pgvault.ha.cluster_restore import ClusterRestore

    target = _make_target(kw)
    if target.kind == "end" and not kw["backup_id"]:
        raise UsageError("ha restore needs a target (--target-time, --target-lsn, --target-xid, --target-name or "
                         "--target immediate)", hint="to rebuild a node from the end of the archive, let Patroni "
                         "reinitialise it instead")
    restore = ClusterRestore(_local(ctx, directory), progress=ctx.progress)
    plan = restore.plan(target, kw["backup_id"], member)
    if not yes:
        click.echo(f"Plan: rewind cluster {plan.scope} to {plan.target} (backup {plan.backup_id}):")
        for number, step in enumerate(plan.steps, start=1):
            click.echo(f"  {number}. {step}")
        click.echo("Every connection is cut and writes stop until step 5.")
        if not click.confirm("Go ahead?", default=False):
            raise UsageError("ha restore cancelled; nothing was changed")
    report = restore.run(plan, target, kw["backup_id"], timeout=timeout)
    if as_json:
        _emit_json(report.as_dict())
        return
    for step in report.steps:
        click.echo(f"  {step.seconds:>7.1f} s  {step.name}")
    click.echo(f"cluster {plan.scope} restored to {plan.target} on timeline {report.timeline}: writes available "
               f"after {report.writes_available_s:.1f} s, done in {report.total_s:.1f} s; new backup "
               f"{report.new_backup_id}")
