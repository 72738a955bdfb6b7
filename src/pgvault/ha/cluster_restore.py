"""Point-in-time recovery of a whole Patroni cluster (`pgvault ha restore`), on the local stack.

The target is checked against the repository before anything is touched. Then: stop Patroni on
every node, remove the cluster's state from the DCS (patronictl remove), move each data directory
aside (kept until the end), bootstrap one node with the pgvault method to the target, wait until
writes work through HAProxy and PgBouncer, let the other nodes rebuild as replicas, confirm the new
timeline's history file is in the repository, take a fresh full backup, and only then delete the
old data directories. A failure stops there and says where the old data is.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml

from pgvault.errors import PgvaultError
from pgvault.ha.render import render
from pgvault.ha.stack import NODES, LocalStack, StackState, _venv_program, run_pgvault, stack_secrets
from pgvault.targets import RecoveryTarget

Progress = Callable[[str], None]


@dataclass
class Step:
    name: str
    seconds: float


@dataclass
class ClusterRestorePlan:
    scope: str
    member: str  # the node bootstrapped from the repository
    backup_id: str
    target: str
    steps: list[str]


@dataclass
class ClusterRestoreReport:
    plan: ClusterRestorePlan
    steps: list[Step] = field(default_factory=list)
    writes_available_s: float | None = None  # from stopping the cluster to the first write through PgBouncer
    total_s: float | None = None
    timeline: int | None = None
    history_file: str | None = None
    new_backup_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"scope": self.plan.scope, "member": self.plan.member, "backup_id": self.plan.backup_id,
                "target": self.plan.target, "timeline": self.timeline, "history_file": self.history_file,
                "new_backup_id": self.new_backup_id, "writes_available_s": self.writes_available_s,
                "total_s": self.total_s, "steps": [{"name": s.name, "seconds": s.seconds} for s in self.steps]}


def bootstrap_keys(target: RecoveryTarget, backup_id: str | None) -> dict[str, str]:
    """The target as extra keys of bootstrap.pgvault, which Patroni passes on as --key=value."""
    keys: dict[str, str] = {}
    match target.kind:
        case "time":
            assert target.time is not None
            keys["target-time"] = target.time.isoformat()
        case "lsn":
            keys["target-lsn"] = str(target.lsn)
        case "xid":
            keys["target-xid"] = str(target.xid)
        case "name":
            assert target.name is not None
            keys["target-name"] = target.name
        case "immediate":
            keys["target"] = "immediate"
    if target.kind in ("time", "lsn", "xid") and not target.inclusive:
        keys["target-exclusive"] = "true"
    keys["target-timeline"] = str(target.timeline)
    if backup_id:
        keys["backup"] = backup_id
    return keys


def bootstrap_config(state: StackState, node: str, keys: dict[str, str]) -> str:
    """The node's patroni.yml with bootstrap.method pgvault and the target keys."""
    config = yaml.safe_load(render("patroni.yml", state.variables(node=node)))
    config["bootstrap"]["method"] = "pgvault"
    config["bootstrap"]["pgvault"].update(keys)
    return "# rendered by pgvault ha restore: bootstrap from the repository\n" + yaml.safe_dump(config, sort_keys=False)


class ClusterRestore:
    def __init__(self, stack: LocalStack, progress: Progress) -> None:
        self.stack = stack
        self.state = stack.require_state()
        self.progress = progress

    def plan(self, target: RecoveryTarget, backup_id: str | None, member: str | None) -> ClusterRestorePlan:
        """Check the target against the repository (as restore does); nothing is touched."""
        from pgvault.catalog import Catalog
        from pgvault.config import load_policy
        from pgvault.pg.waldump import waldump_path
        from pgvault.recoverable import Recoverable
        from pgvault.repo import open_storage
        from pgvault.restore import RestoreRequest, plan_restore

        if member is not None and member not in NODES:
            raise PgvaultError(f"--member {member!r} is not a node of the stack", hint="one of: " + ", ".join(NODES))
        node = member or self.stack.leader(self.state) or NODES[0]
        policy = load_policy(self.state.node_policy(node))
        storage = open_storage(policy.repository)
        info = Catalog(storage, policy.cluster).require_cluster_info()
        view = Recoverable(storage, policy.cluster, waldump_path(policy.postgres.bindir, info.pg_version))
        plan = plan_restore(view, RestoreRequest(pgdata=self.state.data_dir(node), target=target, backup_id=backup_id))
        others = [n for n in NODES if n != node]
        return ClusterRestorePlan(
            scope=self.state.scope, member=node, backup_id=plan.backup.id, target=plan.target.describe(),
            steps=[
                f"stop Patroni and PostgreSQL on {', '.join(NODES)}",
                f"remove cluster {self.state.scope!r} from the DCS (patronictl remove)",
                "move each data directory aside (kept until the end)",
                f"bootstrap {node} from backup {plan.backup.id} to {plan.target.describe()} and promote",
                "wait until writes work through HAProxy and PgBouncer",
                f"rebuild {', '.join(others)} as replicas of {node}",
                "confirm the new timeline's history file is in the repository",
                "take a fresh full backup",
                "delete the old data directories",
            ])

    @contextmanager
    def _step(self, report: ClusterRestoreReport, name: str) -> Iterator[None]:
        self.progress(f"ha restore: {name} ...")
        clock = time.monotonic()
        yield
        seconds = round(time.monotonic() - clock, 1)
        report.steps.append(Step(name, seconds))
        self.progress(f"ha restore: {name}: done in {seconds:.1f} s")

    def run(self, plan: ClusterRestorePlan, target: RecoveryTarget, backup_id: str | None,
            timeout: float = 3600) -> ClusterRestoreReport:
        from pgvault.config import load_policy
        from pgvault.repo import open_storage

        state, stack, node = self.state, self.stack, plan.member
        report = ClusterRestoreReport(plan)
        clock = time.monotonic()
        secrets = stack_secrets(state.root)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = {n: state.data_dir(n).with_name(f"data.before-restore-{stamp}") for n in NODES}
        try:
            with self._step(report, "stop Patroni on every node"):
                leader = stack.leader(state)
                for n in sorted(NODES, key=lambda x: x == leader):
                    stack.stop_patroni(state, n)
            with self._step(report, "remove the cluster from the DCS"):
                self._remove_dcs(state)
            with self._step(report, "move the data directories aside"):
                for n in NODES:
                    if state.data_dir(n).exists():
                        state.data_dir(n).rename(aside[n])
            with self._step(report, f"bootstrap {node} from the repository"):
                config = state.patroni_config(node)
                config.write_text(bootstrap_config(state, node, bootstrap_keys(target, backup_id)))
                stack.start_patroni(state, node, secrets)
                stack.wait_leader(state, timeout)
            with self._step(report, "wait for writes through HAProxy and PgBouncer"):
                stack.wait_writable(state, timeout)
            report.writes_available_s = round(time.monotonic() - clock, 1)
            self.progress(f"ha restore: writes available {report.writes_available_s:.1f} s after the cluster stopped")
            # The bootstrap keys are spent: a later restart must not see them.
            config.write_text(render("patroni.yml", state.variables(node=node)))
            with self._step(report, "rebuild the replicas"):
                for n in NODES:
                    if n != node:
                        stack.start_patroni(state, n, secrets)
                stack.wait_healthy(state, timeout)
                stack.wait_readable(state, timeout)
            policy = load_policy(state.node_policy(node))
            storage = open_storage(policy.repository)
            with self._step(report, "confirm the history file is in the repository"):
                report.timeline, report.history_file = self._confirm_history(state, node, storage, policy.cluster)
            with self._step(report, "take a fresh full backup"):
                out = run_pgvault(state, node, "backup", "--annotate", f"reason=after ha restore to {plan.target}")
                report.new_backup_id = out.strip().splitlines()[-1]
            with self._step(report, "delete the old data directories"):
                for path in aside.values():
                    shutil.rmtree(path, ignore_errors=True)
        except PgvaultError as exc:
            kept = [str(p) for p in aside.values() if p.exists()]
            raise PgvaultError(f"ha restore stopped: {exc.message}",
                               hint=(f"the old data directories are kept: {', '.join(kept)}; " if kept else "")
                               + f"logs under {state.root}") from exc
        report.total_s = round(time.monotonic() - clock, 1)
        return report

    def _remove_dcs(self, state: StackState) -> None:
        config = state.patroni_config(NODES[0])
        answers = f"{state.scope}\nYes I am aware\n"
        run = subprocess.run([_venv_program("patronictl"), "-c", str(config), "remove", state.scope],
                             input=answers, capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
            raise PgvaultError(f"patronictl remove {state.scope} failed: {tail}")

    def _confirm_history(self, state: StackState, node: str, storage: Any, cluster: str,
                         timeout: float = 120) -> tuple[int, str]:
        import psycopg

        from pgvault.repo.layout import Layout

        with psycopg.connect(state.conninfo(f"{node}_pg"), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
        timeline = int(row[0]) if row else 0
        name = f"{timeline:08X}.history"
        key = Layout(cluster).wal_key(name)
        deadline = time.monotonic() + timeout
        while storage.head(key) is None:
            if time.monotonic() > deadline:
                raise PgvaultError(f"{name}, the new timeline's history file, did not reach the repository "
                                   f"within {timeout:.0f} s", hint="archiving is broken: run pgvault check")
            time.sleep(0.5)
        self.progress(f"ha restore: timeline {timeline}; {name} is in the repository")
        return timeline, name
