"""`pgvault demo`: the whole job on a throwaway PostgreSQL, with numbers.

It archives WAL, takes a backup, commits batches of rows over a few seconds, restores to a moment
between two batches into a second instance, and compares what came back with what was committed
by then. Everything lives in one temp directory that is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

import yaml

from pgvault.pg.instance import LocalInstance, chown_to_db_user

Progress = Callable[[str], None]
BATCHES = 5
ROWS_PER_BATCH = 1000
PAUSE_S = 0.6
TARGET_AFTER_BATCH = 3


@dataclass
class DemoReport:
    steps: list[tuple[str, float]] = field(default_factory=list)
    target: datetime | None = None
    expected: dict[int, int] = field(default_factory=dict)
    recovered: dict[int, int] = field(default_factory=dict)
    backup_id: str = ""
    workdir: str = ""
    kept: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.expected) and self.expected == self.recovered

    def render(self) -> str:
        lines = ["pgvault demo", ""]
        for name, seconds in self.steps:
            lines.append(f"  {name:<58} {seconds:7.2f} s")
        lines.append("")
        if self.target is not None:
            lines.append(f"  backup {self.backup_id}; restore target {self.target.isoformat(sep=' ')}")
        lines.append(f"  {'batch':<8}{'committed':>12}{'expected':>10}{'recovered':>11}")
        for batch in range(1, BATCHES + 1):
            expected = self.expected.get(batch, 0)
            got = self.recovered.get(batch, 0)
            when = "before" if batch <= TARGET_AFTER_BATCH else "after"
            lines.append(f"  {batch:<8}{when + ' target':>12}{expected:>10}{got:>11}")
        lines.append("")
        verdict = "OK: the restore holds exactly the rows committed before the target" if self.ok else (
            "FAILED: the restored rows differ from what was committed before the target")
        lines.append(verdict)
        if self.kept:
            lines.append(f"kept {self.workdir}")
        return "\n".join(lines)


@contextmanager
def _interruptible_once() -> Iterator[None]:
    """The first Ctrl-C or SIGTERM interrupts the demo; any later one must not cut its cleanup short."""
    interrupted = False

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _pgvault_command() -> list[str]:
    from pgvault.pg.recovery import self_command

    return self_command()


def reexec_as_db_user(*, keep: bool, quiet: bool, debug: bool) -> int:
    """As root, the demo runs wholly as the postgres user: the server and its archive_command do."""
    flags = [flag for flag, on in (("--quiet", quiet), ("--debug", debug)) if on]
    cmd = [*_pgvault_command(), *flags, "demo"]
    if keep:
        cmd.append("--keep")
    # Drop privileges directly rather than through runuser, which SIGKILLs its child 2 s after a
    # SIGTERM: the demo needs longer than that to stop its servers and clean up.
    user = pwd.getpwnam("postgres")
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    proc = subprocess.Popen(cmd, cwd="/tmp", user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env)

    def forward(_signum: int, _frame: FrameType | None) -> None:
        # The demo must clean up, so it decides when to exit: pass the interrupt on and keep waiting.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(progress: Progress, keep: bool = False) -> DemoReport:
    from pgvault.backup import run_backup
    from pgvault.cluster import check_cluster, init_cluster
    from pgvault.config import load_policy
    from pgvault.pg.instance import pg_tool
    from pgvault.repo import open_storage
    from pgvault.restore import RestoreRequest, restore
    from pgvault.targets import make_target

    report = DemoReport()
    workdir = Path(tempfile.mkdtemp(prefix="pgvault-demo-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    chown_to_db_user(workdir)
    report.workdir = str(workdir)
    instances: list[LocalInstance] = []

    def step(name: str) -> Callable[[], None]:
        progress(name)
        started = time.monotonic()
        return lambda: report.steps.append((name, time.monotonic() - started))

    try:
        with _interruptible_once():
            done = step("start a throwaway PostgreSQL with WAL archiving")
            config = workdir / "policy.yaml"
            primary = LocalInstance.create(workdir / "primary", settings={})
            instances.append(primary)
            archive_command = " ".join(shlex.quote(p) for p in _pgvault_command())
            archive_command += f" --config {shlex.quote(str(config))} wal-push %p"
            policy_data = {
                "cluster": "demo",
                "postgres": {"conninfo": primary.conninfo()},
                "repository": {"url": f"file://{workdir / 'repo'}"},
                "backup": {"part_size": "16MiB"},
            }
            config.write_text(yaml.safe_dump(policy_data, sort_keys=False))
            from pgvault.pg.autoconf import set_auto_conf

            set_auto_conf(primary.pgdata, {"wal_level": "replica", "archive_mode": "on",
                                           "archive_command": archive_command})
            primary.start()
            policy = load_policy(config)
            storage = open_storage(policy.repository)
            done()

            done = step("pgvault init + check (a WAL switch through the archive)")
            init_cluster(policy, storage)
            check_cluster(policy, storage)
            primary.psql("CREATE TABLE demo_rows (batch int NOT NULL, n int NOT NULL, payload text NOT NULL)")
            done()

            done = step("pgvault backup")
            record = run_backup(policy, storage, annotations={"source": "demo"})
            report.backup_id = record.id
            done()

            done = step(f"commit {BATCHES} batches of {ROWS_PER_BATCH} rows, {PAUSE_S}s apart")
            commit_times: list[datetime] = []
            for batch in range(1, BATCHES + 1):
                time.sleep(PAUSE_S)
                primary.psql(f"INSERT INTO demo_rows SELECT {batch}, g, md5(g::text) "
                             f"FROM generate_series(1, {ROWS_PER_BATCH}) g")
                commit_times.append(datetime.now(UTC))
                report.expected[batch] = ROWS_PER_BATCH if batch <= TARGET_AFTER_BATCH else 0
            report.expected = {b: n for b, n in report.expected.items() if n}
            # The next batch starts only after a PAUSE_S sleep: half of it is safely between the two.
            report.target = commit_times[TARGET_AFTER_BATCH - 1] + timedelta(seconds=PAUSE_S / 2)
            check_cluster(policy, storage)  # switch WAL and wait: the last batch is archived
            done()

            done = step("pgvault restore --target-time (into a new directory)")
            restored_dir = workdir / "restored"
            target = make_target(time=report.target)
            restore(storage, policy, RestoreRequest(pgdata=restored_dir, target=target, archive_mode="off",
                                                    config_path=config),
                    waldump=pg_tool("pg_waldump", record.pg_version // 10000), progress=progress)
            done()

            done = step("start the restored copy; recover to the target")
            restored = LocalInstance.existing(restored_dir)
            instances.append(restored)
            restored.start()
            restored.wait_promoted()
            rows = restored.query("SELECT batch, count(*) FROM demo_rows GROUP BY batch ORDER BY batch")
            report.recovered = {int(b): int(n) for b, n in rows}
            done()
    finally:
        for instance in reversed(instances):
            # Cleanup must go on; the first error is what the user needs to see.
            with contextlib.suppress(Exception):
                instance.stop(mode="immediate")
        if keep:
            report.kept = True
            progress(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return report
