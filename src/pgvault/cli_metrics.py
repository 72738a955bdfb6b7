"""metrics: the Prometheus metrics command."""

from __future__ import annotations

import click

from pgvault.cli import Context, Parsed, _emit_json, cli, pass_context


def _listen(text: str) -> str:
    from pgvault.metrics import parse_listen

    parse_listen(text)
    return text.strip()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the values as JSON instead of the Prometheus format.")
@click.option("--listen", metavar="HOST:PORT", type=Parsed("HOST:PORT", _listen),
              help="Serve them at http://HOST:PORT/metrics until stopped, instead of printing them once.")
@pass_context
def metrics(ctx: Context, as_json: bool, listen: str | None) -> None:
    """Print the repository's metrics in the Prometheus text format (or serve them over HTTP).

    Last backup (time, size, duration), WAL archive lag, repository size, recoverable window,
    newest verify and drill results; every metric is named pgvault_* and labelled cluster.

    Example: pgvault --config /etc/pgvault/main.yaml metrics
    """
    import time

    from pgvault.errors import UsageError
    from pgvault.metrics import collect, render, serve

    if listen is not None and as_json:
        raise UsageError("give --json or --listen, not both", hint="--listen serves the Prometheus format only")
    policy = ctx.policy()
    storage = ctx.storage(policy)
    # Read once before anything else, also when serving: a repository that cannot be read is an
    # error now (exit 1), not a server that answers only pgvault_collect_success 0.
    snapshot = collect(policy, storage)
    if listen is None:
        if as_json:
            _emit_json(snapshot.as_dict(time.time()))
        else:
            click.echo(render(policy.cluster, snapshot, time.time()), nl=False)
        return
    server = serve(policy, storage, listen)
    ctx.progress(f"serving metrics of cluster {policy.cluster} at {server.url}")
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()
