"""The HA stack with real processes: 3 etcd members, 3 Patroni nodes (PostgreSQL 15), HAProxy and
PgBouncer on 127.0.0.1, started by `pgvault stack up --runtime local` from the compose templates.

One stack serves the module, in order: endpoints and routing, the scheduler's one backup from a
replica, failover under load, cluster PITR through Patroni, and `stack down` leaving nothing behind.
Each test leaves the stack healthy for the next.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from conftest import PGVAULT, make_workdir, processes_in, run_pgvault, wait_for

from pgvault.ha.render import parse_env_file
from pgvault.ha.stack import NODES, StackState
from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, chown_to_db_user

pytestmark = pytest.mark.integration

SCOPE = "yieldsensei"


@dataclass
class Stack:
    work: Path
    root: Path
    policy: Path
    password: str = ""
    restored: list[LocalInstance] = field(default_factory=list)
    conns: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)

    @property
    def state(self) -> StackState:
        state = StackState.load(self.root)
        assert state is not None
        return state

    def cli(self, *args: str, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # As root, as an operator would: the local runtime runs the services as the postgres user.
        return subprocess.run([PGVAULT, "--config", str(self.policy), *args], capture_output=True, text=True,
                              timeout=timeout, input=stdin, cwd="/tmp", check=False)

    def stack(self, command: str, *args: str) -> dict[str, Any]:
        run = self.cli("stack", command, "--runtime", "local", "--dir", str(self.root), "--json", *args)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def connect(self, port_name: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=self.state.ports[port_name], user="postgres",
                               dbname="postgres", password=self.password, connect_timeout=5, autocommit=True,
                               **kwargs)

    def sql(self, port_name: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on a kept connection per endpoint: HAProxy admits only 20 new connections per
        client address per 3 s, and every client here is 127.0.0.1. A connection HAProxy cut (a
        failover, a restore) is replaced once."""
        for attempt in (1, 2):
            conn = self.conns.get(port_name)
            if conn is None or conn.closed:
                conn = self.conns[port_name] = self.connect(port_name)
            try:
                cur = conn.execute(sql, params or None)
                return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                conn.close()
                if attempt == 2:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def close_all(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

    def members(self) -> list[dict[str, Any]]:
        """The cluster as the first member that answers describes it (a killed one does not)."""
        error: OSError | None = None
        for node in NODES:
            try:
                with urllib.request.urlopen(self.state.rest_url(node) + "/cluster", timeout=5) as response:
                    return json.loads(response.read())["members"]
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def leader(self) -> str | None:
        try:
            return next((m["name"] for m in self.members() if m["role"] == "leader" and m["state"] == "running"),
                        None)
        except OSError:
            return None

    def healthy(self) -> bool:
        try:
            members = self.members()
        except OSError:
            return False
        leaders = [m for m in members if m["role"] == "leader" and m["state"] == "running"]
        replicas = [m for m in members if m["role"] in ("replica", "sync_standby") and m["state"] == "streaming"]
        return len(leaders) == 1 and len(replicas) == 2 and {m.get("timeline") for m in members} == {
            leaders[0].get("timeline")}

    def pgvault(self, node: str, *args: str, timeout: float = 600) -> Any:
        return run_pgvault(*args, config=self.state.node_policy(node), timeout=timeout)

    def flush_archive(self) -> None:
        """Switch WAL on the leader and wait until it has nothing left to archive."""
        self.sql("haproxy_write", "SELECT pg_switch_wal()")
        wait_for(lambda: self.sql("haproxy_write", "SELECT count(*) FROM pg_ls_archive_statusdir() "
                                  "WHERE name LIKE '%.ready'")[0][0] == 0, "the leader's archive to drain",
                 timeout=120, interval=0.3)

    def restore_copy(self, *flags: str) -> LocalInstance:
        """Restore from the repository into a scratch instance (archiving off), started and promoted."""
        pgdata = self.work / f"restored-{len(self.restored)}"
        leader = self.leader() or NODES[0]
        result = self.pgvault(leader, "restore", "--pgdata", str(pgdata), "--archive-mode", "off", *flags)
        assert result.returncode == 0, result.stderr
        instance = LocalInstance.existing(pgdata)
        # The copy carries Patroni's pg_hba.conf (passwords) and hba_file aimed at a node's directory.
        (pgdata / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        set_auto_conf(pgdata, {"hba_file": str(pgdata / "pg_hba.conf"), "ident_file": str(pgdata / "pg_ident.conf")})
        chown_to_db_user(pgdata)
        self.restored.append(instance)
        instance.start(timeout=300)
        instance.wait_promoted(timeout=300)
        return instance


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    work = make_workdir("pgvault-ha-")
    repo = work / "repo"
    repo.mkdir()
    chown_to_db_user(repo)
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "cluster": SCOPE,
        "postgres": {"conninfo": "host=127.0.0.1 user=postgres"},  # each node's policy aims at its node
        "repository": {"url": f"file://{repo}"},
        "backup": {"wal_timeout": "120s"},
        # Yearly, so that three schedulers started a moment apart see the very same slot.
        "schedule": {"backup": "0 0 1 1 *", "verify": "off", "drill": "off", "backup_from": "replica",
                     "metrics_listen": ""},
    }))
    handle = Stack(work=work, root=work / "stack", policy=policy)
    try:
        data = handle.stack("up")
        assert data["runtime"] == "local"
        handle.password = parse_env_file((handle.root / "secrets" / "stack.env").read_text())["POSTGRES_PASSWORD"]
        yield handle
    finally:
        handle.close_all()
        for instance in handle.restored:
            instance.destroy()
        handle.cli("stack", "down", "--runtime", "local", "--dir", str(handle.root))
        for line in processes_in(handle.root):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        if os.environ.get("PGVAULT_TEST_KEEP"):
            print(f"kept {work}")  # the services' logs, for a failure to be read
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---- 1. up: a leader, two streaming replicas, writes and reads routed --------------------------------------

def test_up_reaches_a_leader_and_two_streaming_replicas_and_routes_writes_and_reads(stack: Stack) -> None:
    status = stack.stack("status")
    roles = sorted((m["role"], m["state"]) for m in status["members"])
    assert roles.count(("leader", "running")) == 1, roles
    assert sum(1 for role, state in roles if role in ("replica", "sync_standby") and state == "streaming") == 2, roles
    assert len({m["timeline"] for m in status["members"]}) == 1
    leader = status["leader"]
    ports = stack.state.ports
    replica_ports = {ports[f"{n}_pg"] for n in NODES if n != leader}

    # `up` is idempotent: a second call starts nothing new.
    pids = {name: p["pid"] for name, p in status["processes"].items()}
    again = stack.stack("up")
    assert {name: p["pid"] for name, p in again["processes"].items()} == pids

    stack.sql("pgbouncer", "CREATE TABLE routed (id int PRIMARY KEY, via text)")
    port, in_recovery = stack.sql("pgbouncer", "INSERT INTO routed VALUES (1, 'pgbouncer') "
                                  "RETURNING inet_server_port(), pg_is_in_recovery()")[0]
    assert (port, in_recovery) == (ports[f"{leader}_pg"], False), "a write through PgBouncer lands on the leader"
    port, in_recovery = stack.sql("haproxy_write", "SELECT inet_server_port(), pg_is_in_recovery()")[0]
    assert (port, in_recovery) == (ports[f"{leader}_pg"], False)

    port, in_recovery = stack.sql("haproxy_read", "SELECT inet_server_port(), pg_is_in_recovery()")[0]
    assert port in replica_ports and in_recovery is True, "a read through the read port lands on a replica"
    def replicated() -> bool:
        try:
            return stack.sql("haproxy_read", "SELECT via FROM routed WHERE id = 1") == [("pgbouncer",)]
        except psycopg.errors.UndefinedTable:
            return False  # the replica has not replayed the CREATE TABLE yet (the sync standby may be the other)

    wait_for(replicated, "the row on the replica", timeout=30, interval=0.2)
    with urllib.request.urlopen(status["endpoints"]["haproxy_stats"], timeout=5) as response:
        assert response.status == 200 and b"primary_nodes" in response.read()

    # HAProxy's rate limit: at most 20 new connections per client address per 3 s on an entry point.
    # Plain TCP connections, opened in a few milliseconds (PostgreSQL logins would take long enough
    # on a loaded machine for the 3 s window to slide): HAProxy closes a refused one at once.
    time.sleep(3.5)  # what this test opened so far has left the 3 s window
    sockets: list[socket.socket] = []
    refused = 0
    for _ in range(30):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", ports["haproxy_read"]), timeout=5))
        except ConnectionResetError:
            refused += 1  # on loopback HAProxy's reset of a refused connection can beat connect()'s return
    time.sleep(1)  # a refused one is closed by now; an admitted one waits for a startup packet
    readable, _, _ = select.select(sockets, [], [], 0)
    for sock in readable:
        try:
            refused += sock.recv(1) == b""
        except ConnectionResetError:
            refused += 1
    for sock in sockets:
        sock.close()
    # HAProxy's conn_rate is a sliding estimate over the period: allow one either way of 20.
    assert 9 <= refused <= 11, f"{30 - refused} of 30 connections admitted within 3 s"
    time.sleep(3.5)

    # No password in what status prints, in the rendered configs or in any process's command line.
    assert stack.password not in json.dumps(status)
    for config in [*stack.root.glob("*/patroni.yml"), *stack.root.glob("*/pgvault.yaml"),
                   stack.root / "haproxy" / "haproxy.cfg", stack.root / "pgbouncer" / "pgbouncer.ini"]:
        assert stack.password not in config.read_text(), config
    assert not [line for line in processes_in(stack.root) if stack.password in line]
    secret = stack.root / "pgbouncer" / "run" / "pgbouncer.users"
    assert secret.stat().st_mode & 0o077 == 0 and stack.password in secret.read_text()


# ---- 4. the scheduler takes one backup, on the replica the policy picks -------------------------------------

def test_three_schedulers_take_one_backup_from_the_replica_the_policy_picks(stack: Stack) -> None:
    from pgvault.config import load_policy
    from pgvault.repo import open_storage
    from pgvault.scheduler import SchedulerState, StateStore

    # The policy's rule (first replica by name that streams with a known lag under max_replica_lag,
    # 64 MiB) is applied at the slot; an idle stack whose replicas all report a known lag far below
    # that keeps the answer fixed between here and there. Patroni reports a replica's lag as
    # "unknown" for a while after it (re)joins, and such a replica is rightly passed over.
    def settled_replicas() -> list[str] | None:
        if not stack.healthy():
            return None
        replicas = [m for m in stack.members() if m["role"] in ("replica", "sync_standby")]
        settled = all(isinstance(m.get("lag"), int) and m["lag"] <= 1024 * 1024 for m in replicas)
        return sorted(m["name"] for m in replicas) if settled else None

    wait_for(lambda: settled_replicas() is not None, "two replicas streaming with a known, small lag", timeout=120,
             interval=0.5)
    members = stack.members()
    expected = (settled_replicas() or ["?"])[0]
    policy = load_policy(stack.state.node_policy(NODES[0]))
    storage = open_storage(policy.repository)
    # A scheduler that has run for two years: this year's 1 January slot is owed once.
    StateStore(storage, SCOPE).write(SchedulerState(created=datetime.now(UTC) - timedelta(days=730)))
    chown_to_db_user(stack.work / "repo")  # written as root here; the schedulers run as postgres
    before = _backup_ids(stack)

    # The schedulers as the stack runs them: daemons, one per node, started together.
    # As the postgres user directly (not through runuser, which would take the SIGTERM itself).
    import pwd

    db_user = pwd.getpwnam("postgres")
    procs = {node: subprocess.Popen(
        [PGVAULT, "--config", str(stack.state.node_policy(node)), "schedule", "run"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd="/tmp", user=db_user.pw_uid, group=db_user.pw_gid, extra_groups=[],
        env={**os.environ, "HOME": db_user.pw_dir})
        for node in NODES}
    try:
        def settled() -> bool:
            state = StateStore(storage, SCOPE).read()
            return state is not None and "backup" in state.jobs and state.jobs["backup"].status in ("ok", "failed")

        wait_for(settled, "the slot's backup to finish", timeout=180, interval=0.5)
        time.sleep(3)  # time for a second backup, were one (wrongly) to start
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
    outputs = {node: proc.communicate(timeout=120) for node, proc in procs.items()}
    # On failure, what each scheduler said and what Patroni saw before and after the slot.
    logs = "\n".join(f"--- {node}:\n{outputs[node][1][-3000:]}" for node in NODES)
    context = f"members before: {members}\nmembers after: {stack.members()}\n{logs}"
    for node, proc in procs.items():
        assert proc.returncode == 0, f"{node}: {outputs[node][1]}"

    new = _backup_ids(stack) - before
    assert len(new) == 1, f"one backup for the slot, not {new}\n{context}"
    record = json.loads(stack.pgvault(expected, "info", new.pop(), "--json").stdout)
    assert record["annotations"].get("node") == expected, f"{record['annotations']}\n{context}"
    state = StateStore(storage, SCOPE).read()
    assert state is not None and (state.jobs["backup"].status, state.jobs["backup"].member) == ("ok", expected), (
        f"{state}\n{context}")
    # It came from a replica: that node was in recovery (and its conninfo aims at that node only).
    port = stack.state.ports[f"{expected}_pg"]
    assert f"port={port} " in load_policy(stack.state.node_policy(expected)).postgres.conninfo + " "
    assert stack.sql(f"{expected}_pg", "SELECT pg_is_in_recovery()") == [(True,)]
    for node in NODES:
        if node != expected:
            assert "backup started" not in outputs[node][1], f"{node} must not take the backup"


def _backup_ids(stack: Stack) -> set[str]:
    result = stack.pgvault(NODES[0], "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    items = data["backups"] if isinstance(data, dict) else data
    return {item["id"] for item in items}


# ---- 2. failover under load: every acknowledged row is in the repository -----------------------------------

class Writer(threading.Thread):
    """Commits numbered rows through PgBouncer, one per transaction, reconnecting after errors."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.acked: list[int] = []
        self.acked_at: list[float] = []
        self.attempted = 0
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        n = 1
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self.stack.connect("pgbouncer")
                self.attempted = max(self.attempted, n)
                conn.execute("INSERT INTO ledger (id) VALUES (%s)", (n,))
            except psycopg.errors.UniqueViolation:
                pass  # the try before committed, but its acknowledgement was lost with the connection
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
                continue
            self.acked.append(n)
            self.acked_at.append(time.monotonic())
            n += 1
            time.sleep(0.01)
        if conn is not None:
            conn.close()


def test_failover_under_load_loses_no_acknowledged_row_in_the_repository(stack: Stack) -> None:
    wait_for(stack.healthy, "a healthy stack", timeout=120, interval=0.5)
    old_leader = stack.leader()
    assert old_leader is not None
    old_timeline = next(m["timeline"] for m in stack.members() if m["name"] == old_leader)
    stack.sql("pgbouncer", "CREATE TABLE ledger (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
    assert stack.pgvault(old_leader, "backup").returncode == 0

    writer = Writer(stack)
    writer.start()
    try:
        _failover_under_load(stack, writer, old_leader, old_timeline)
    finally:
        writer.stop.set()
        writer.join(timeout=30)


def _failover_under_load(stack: Stack, writer: Writer, old_leader: str, old_timeline: int) -> None:
    wait_for(lambda: len(writer.acked) >= 100, "100 rows written", timeout=60, interval=0.1)
    state = stack.state
    postmaster = int((state.data_dir(old_leader) / "postmaster.pid").read_text().split()[0])
    killed_at = time.monotonic()
    os.killpg(state.processes[old_leader].pid, signal.SIGKILL)
    os.kill(postmaster, signal.SIGKILL)

    new_leader = wait_for(lambda: (leader := stack.leader()) not in (None, old_leader) and leader, "a new leader",
                          timeout=120, interval=0.5)
    wait_for(lambda: sum(1 for t in writer.acked_at if t > killed_at) >= 50, "50 rows written after the failover",
             timeout=120, interval=0.2)
    writer.stop.set()
    writer.join(timeout=30)
    first_after = next(t for t in writer.acked_at if t > killed_at)
    print(f"failover: writes resumed {first_after - killed_at:.1f} s after kill -9 of the leader "
          f"({old_leader} -> {new_leader})")
    assert writer.acked == list(range(1, len(writer.acked) + 1))

    # The killed node comes back (stack up starts what is missing) and rejoins, through pg_rewind,
    # after Patroni archived what it had not archived yet.
    stack.stack("up")
    wait_for(stack.healthy, "the old leader back as a replica", timeout=180, interval=0.5)
    new_timeline = next(m["timeline"] for m in stack.members() if m["name"] == new_leader)
    assert new_timeline > old_timeline
    stack.flush_archive()

    # The new leader archived the old timeline's last, partial segment under its .partial name
    # (never in the way of the full segment of that name), and the new timeline's history file.
    wal = stack.work / "repo" / SCOPE / "wal"
    assert [p for p in wal.rglob(f"{old_timeline:08X}*.partial*") if not p.name.endswith(".meta")], \
        sorted(p.name for p in wal.rglob("*"))
    assert list(wal.rglob(f"{new_timeline:08X}.history*"))

    verify = stack.pgvault(new_leader, "verify", "--json")
    report = json.loads(verify.stdout)
    assert verify.returncode == 0 and report["gaps"] == [], verify.stdout + verify.stderr
    assert any(w["timeline"] == new_timeline for w in report["windows"]), report["windows"]

    instance = stack.restore_copy("--target-timeline", "latest")
    restored = [row[0] for row in instance.query("SELECT id FROM ledger ORDER BY id")]
    missing = sorted(set(writer.acked) - set(restored))
    assert not missing, f"acknowledged rows missing after PITR to the end of the archive: {missing[:20]}"
    assert set(restored) <= set(range(1, writer.attempted + 1)), "no row that was never written"
    assert instance.query("SELECT timeline_id FROM pg_control_checkpoint()")[0][0] > new_timeline


# ---- 3. cluster PITR through Patroni ---------------------------------------------------------------------

def test_ha_restore_rewinds_the_cluster_to_the_minute_before_a_bad_migration(stack: Stack) -> None:
    wait_for(stack.healthy, "a healthy stack", timeout=120, interval=0.5)
    stack.sql("pgbouncer", "CREATE TABLE trades (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
    stack.sql("pgbouncer", "INSERT INTO trades (id) SELECT generate_series(1, 100)")
    assert stack.pgvault(stack.leader() or NODES[0], "backup").returncode == 0
    stack.sql("pgbouncer", "INSERT INTO trades (id) SELECT generate_series(101, 150)")
    time.sleep(1.1)
    target = stack.sql("haproxy_write", "SELECT now()")[0][0]
    expected = stack.sql("haproxy_write", "SELECT id, at FROM trades ORDER BY id")
    time.sleep(1.1)
    stack.sql("pgbouncer", "INSERT INTO trades (id) SELECT generate_series(151, 200)")
    stack.sql("pgbouncer", "DROP TABLE trades")  # the bad migration
    stack.flush_archive()
    before = stack.stack("status")
    old_timeline = max(m["timeline"] for m in before["members"])

    # A target the repository cannot reach is refused before anything is touched.
    refused = stack.cli("ha", "restore", "--dir", str(stack.root), "--target-time", "2001-01-01 00:00:00+00",
                        "--yes")
    assert refused.returncode != 0 and refused.stderr.startswith("error:"), refused.stderr
    assert "Traceback" not in refused.stderr
    # Without --yes it shows the plan and asks; "no" changes nothing.
    declined = stack.cli("ha", "restore", "--dir", str(stack.root), "--target-time", target.isoformat(), stdin="n\n")
    assert declined.returncode != 0 and "Plan:" in declined.stdout and "take a fresh full backup" in declined.stdout
    after = stack.stack("status")
    assert {k: v["pid"] for k, v in after["processes"].items()} == {k: v["pid"] for k, v in before["processes"].items()}
    assert stack.sql("pgbouncer", "SELECT to_regclass('trades') IS NULL") == [(True,)]

    run = stack.cli("ha", "restore", "--dir", str(stack.root), "--target-time", target.isoformat(), "--yes",
                    "--json", timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    print(f"ha restore: writes available after {report['writes_available_s']} s, total {report['total_s']} s")
    assert report["timeline"] > old_timeline
    assert report["history_file"] == f"{report['timeline']:08X}.history"

    assert stack.sql("pgbouncer", "SELECT id, at FROM trades ORDER BY id") == expected
    assert stack.healthy()
    assert {m["timeline"] for m in stack.members()} == {report["timeline"]}
    stack.sql("pgbouncer", "INSERT INTO trades (id) VALUES (1000)")  # writes work through PgBouncer
    wait_for(lambda: stack.sql("haproxy_read", "SELECT count(*) FROM trades WHERE id = 1000") == [(1,)],
             "the new row on a replica", timeout=30, interval=0.2)
    assert not list(stack.root.glob("*/data.before-restore-*")), "old data directories removed after success"

    # The backup taken afterwards restores too: exactly the rows at the target.
    instance = stack.restore_copy("--backup", report["new_backup_id"], "--target", "immediate")
    assert instance.query("SELECT id, at FROM trades ORDER BY id") == expected


# ---- 1. down: nothing left behind ------------------------------------------------------------------------

def test_down_stops_every_process_it_started_and_nothing_else(stack: Stack) -> None:
    bystander = subprocess.Popen(["sleep", "300"])  # not the stack's: must survive
    try:
        pids = [p.pid for p in stack.state.processes.values()]
        data = stack.stack("down")
        assert set(data["stopped"]) == {*NODES, "etcd1", "etcd2", "etcd3", "haproxy", "pgbouncer"}
        assert processes_in(stack.root) == []
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert not any((stack.state.data_dir(n) / "postmaster.pid").exists() for n in NODES)
        assert bystander.poll() is None
        assert stack.stack("down")["stopped"] == []
    finally:
        bystander.kill()
        bystander.wait()
