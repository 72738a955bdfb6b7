"""The local runtime of the HA stack: the compose deployment's processes on 127.0.0.1.

Three etcd members, three Patroni nodes (PostgreSQL 15), HAProxy and PgBouncer run as processes of
the database OS user, each from the same template the node image renders (ha/render.py), with its
own ports. Everything lives under one stack directory:

    stack.json               ports, processes started (pid + start time), scope
    secrets/stack.env        generated passwords (0600), unless given in the environment
    secrets/pgpass           pgvault's password file for its connections (0600)
    etcd1..3/                etcd.env, data, etcd.log
    pg1..3/                  patroni.yml, pgvault.yaml (the node's policy), data/, run/, patroni.log
    haproxy/, pgbouncer/     config and log

`down` stops exactly the processes `up` recorded (a pid is only signalled while its start time
still matches) and the PostgreSQL servers of the stack's data directories, and keeps the data.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgvault.errors import PgvaultError, UsageError
from pgvault.ha.render import parse_env_file, write_rendered
from pgvault.pg.instance import DB_OS_USER, chown_to_db_user, find_bindir, free_port

Progress = Callable[[str], None]

NODES = ("pg1", "pg2", "pg3")
ETCDS = ("etcd1", "etcd2", "etcd3")
HOST = "127.0.0.1"
STATE_FILE = "stack.json"
SECRET_NAMES = ("POSTGRES_PASSWORD", "REPLICATION_PASSWORD")
DEFAULT_RATE_LIMIT = "20"


def _quiet(_message: str) -> None:
    pass


def default_stack_dir(scope: str) -> Path:
    return Path(os.environ.get("PGVAULT_STACK_DIR") or Path("/var/tmp") / f"pgvault-stack-{scope}")


def _program(name: str) -> str:
    found = shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                        if (p := Path(d) / name).is_file()), None)
    if found is None:
        package = {"etcd": "etcd-server", "haproxy": "haproxy", "pgbouncer": "pgbouncer",
                   "patronictl": "pgvault[ha]", "patroni": "pgvault[ha]"}.get(name, name)
        raise PgvaultError(f"{name} is not installed", hint=f"install {package} (scripts/setup does)")
    return found


def _venv_program(name: str) -> str:
    # Patroni comes with pgvault's `ha` extra: next to this interpreter, resolved so the database
    # user reaches it even through a symlinked venv.
    beside = Path(sys.executable).parent.resolve() / name
    return str(beside) if beside.is_file() else _program(name)


# ---- what the stack is ---------------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    pid: int
    start: str  # /proc/<pid>/stat start time: a reused pid never matches
    argv: list[str]

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields and fields[0] == "Z":
        return None  # a zombie has exited
    return fields[19] if len(fields) > 19 else None


@dataclass
class StackState:
    scope: str
    root: Path
    ports: dict[str, int]
    policy_source: str | None = None
    processes: dict[str, Proc] = field(default_factory=dict)

    # -- ports ------------------------------------------------------------------------------------

    @classmethod
    def allocate(cls, scope: str, root: Path, policy_source: str | None) -> StackState:
        names = ([f"{e}_client" for e in ETCDS] + [f"{e}_peer" for e in ETCDS]
                 + [f"{n}_pg" for n in NODES] + [f"{n}_rest" for n in NODES]
                 + ["haproxy_write", "haproxy_read", "haproxy_stats", "pgbouncer"])
        ports: dict[str, int] = {}
        while len(ports) < len(names):
            port = free_port()
            if port not in ports.values():
                ports[names[len(ports)]] = port
        return cls(scope=scope, root=root, ports=ports, policy_source=policy_source)

    @classmethod
    def load(cls, root: Path) -> StackState | None:
        path = root / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(scope=data["scope"], root=root, ports={k: int(v) for k, v in data["ports"].items()},
                   policy_source=data.get("policy_source"),
                   processes={k: Proc(**v) for k, v in data.get("processes", {}).items()})

    def save(self) -> None:
        data = {"scope": self.scope, "ports": self.ports, "policy_source": self.policy_source,
                "processes": {k: p.__dict__ for k, p in self.processes.items()}}
        tmp = self.root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.root / STATE_FILE)

    # -- places -----------------------------------------------------------------------------------

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def data_dir(self, node: str) -> Path:
        return self.root / node / "data"

    def node_policy(self, node: str) -> Path:
        return self.root / node / "pgvault.yaml"

    def patroni_config(self, node: str) -> Path:
        return self.root / node / "patroni.yml"

    def rest_url(self, node: str) -> str:
        return f"http://{HOST}:{self.ports[f'{node}_rest']}"

    def rest_urls(self) -> list[str]:
        return [self.rest_url(n) for n in NODES]

    def conninfo(self, port_name: str, dbname: str = "postgres") -> str:
        return (f"host={HOST} port={self.ports[port_name]} user=postgres dbname={dbname} "
                f"passfile={self.root / 'secrets' / 'pgpass'}")

    def endpoints(self) -> dict[str, Any]:
        return {
            "write": f"host={HOST} port={self.ports['haproxy_write']}",
            "read": f"host={HOST} port={self.ports['haproxy_read']}",
            "pgbouncer": f"host={HOST} port={self.ports['pgbouncer']}",
            "haproxy_stats": f"http://{HOST}:{self.ports['haproxy_stats']}/",
            "patroni": {n: self.rest_url(n) for n in NODES},
            "postgres": {n: f"host={HOST} port={self.ports[f'{n}_pg']}" for n in NODES},
            "etcd": [f"http://{HOST}:{self.ports[f'{e}_client']}" for e in ETCDS],
            "policies": {n: str(self.node_policy(n)) for n in NODES},
            "passwords": str(self.root / "secrets" / "stack.env"),
        }

    # -- template variables -----------------------------------------------------------------------

    def variables(self, node: str | None = None, etcd: str | None = None) -> dict[str, str]:
        p = self.ports
        v = {
            "STACK_SCOPE": self.scope, "STACK_LISTEN": HOST, "STACK_HOST": HOST,
            "STACK_ETCD_HOSTS": ",".join(f"{HOST}:{p[f'{e}_client']}" for e in ETCDS),
            "STACK_ETCD_INITIAL_CLUSTER": ",".join(f"{e}=http://{HOST}:{p[f'{e}_peer']}" for e in ETCDS),
            "STACK_HAPROXY_HOST": HOST, "STACK_HAPROXY_WRITE_PORT": str(p["haproxy_write"]),
            "STACK_HAPROXY_READ_PORT": str(p["haproxy_read"]), "STACK_HAPROXY_STATS_PORT": str(p["haproxy_stats"]),
            "STACK_HAPROXY_RATE_LIMIT": os.environ.get("STACK_HAPROXY_RATE_LIMIT", DEFAULT_RATE_LIMIT),
            "STACK_PGBOUNCER_PORT": str(p["pgbouncer"]),
            "STACK_PGVAULT": str(Path(sys.executable).parent.resolve() / "pgvault"),
            "STACK_BIN_DIR": str(find_bindir(15)),
        }
        for i, n in enumerate(NODES, start=1):
            v |= {f"STACK_NODE{i}": n, f"STACK_NODE{i}_HOST": HOST, f"STACK_NODE{i}_PG_PORT": str(p[f"{n}_pg"]),
                  f"STACK_NODE{i}_REST_PORT": str(p[f"{n}_rest"])}
        if node is not None:
            v |= {"STACK_NODE": node, "STACK_PG_PORT": str(p[f"{node}_pg"]), "STACK_REST_PORT": str(p[f"{node}_rest"]),
                  "STACK_DATA_DIR": str(self.data_dir(node)), "STACK_RUN_DIR": str(self.node_dir(node) / "run"),
                  "STACK_PGVAULT_CONFIG": str(self.node_policy(node))}
        if etcd is not None:
            v |= {"STACK_ETCD_NAME": etcd, "STACK_ETCD_DATA_DIR": str(self.root / etcd / "data"),
                  "STACK_ETCD_CLIENT_PORT": str(p[f"{etcd}_client"]), "STACK_ETCD_PEER_PORT": str(p[f"{etcd}_peer"])}
        return v


# ---- secrets -------------------------------------------------------------------------------------------

def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def stack_secrets(root: Path) -> dict[str, str]:
    """The stack's passwords: from the environment, else generated once and kept in secrets/stack.env."""
    path = root / "secrets" / "stack.env"
    stored = parse_env_file(path.read_text()) if path.is_file() else {}
    values = {name: os.environ.get(name) or stored.get(name) or pysecrets.token_urlsafe(24) for name in SECRET_NAMES}
    if values != stored:
        _write_secret(path, "# passwords of the local stack (generated by pgvault stack up)\n"
                      + "".join(f"{k}={v}\n" for k, v in values.items()))
    _write_secret(root / "secrets" / "pgpass", f"*:*:*:postgres:{values['POSTGRES_PASSWORD']}\n"
                  f"*:*:*:replicator:{values['REPLICATION_PASSWORD']}\n")
    return values


# ---- node policies -------------------------------------------------------------------------------------

def _default_policy(state: StackState) -> dict[str, Any]:
    return {"cluster": state.scope, "postgres": {"conninfo": ""},
            "repository": {"url": f"file://{state.root / 'repository'}"}}


def write_node_policies(state: StackState, source: Path | None) -> None:
    """Each node's pgvault policy: the given one (or a local repository in the stack directory), with
    conninfo aimed at that node, the primary through HAProxy, and the scheduler's HA settings."""
    from pgvault.config import PostgresConfig, load_policy

    base: dict[str, Any] = yaml.safe_load(source.read_text()) if source else _default_policy(state)
    if not isinstance(base, dict):
        raise UsageError(f"{source} is not a policy (a YAML mapping)")
    for node in NODES:
        policy = json.loads(json.dumps(base))  # a deep copy of plain data
        policy["cluster"] = state.scope
        postgres = policy.setdefault("postgres", {})
        postgres["conninfo"] = state.conninfo(f"{node}_pg")
        if "primary_conninfo" in PostgresConfig.model_fields:
            postgres["primary_conninfo"] = state.conninfo("haproxy_write")
        schedule = policy.setdefault("schedule", {})
        schedule["patroni_urls"] = state.rest_urls()
        schedule["member"] = node
        path = state.node_policy(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# pgvault policy of stack node " + node + " (written by pgvault stack up from "
                        + (str(source) if source else "the built-in default") + ")\n"
                        + yaml.safe_dump(policy, sort_keys=False))
        load_policy(path)  # refuse now, with the loader's message, rather than at the first archive_command


# ---- processes -----------------------------------------------------------------------------------------

def _db_user_kwargs() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam(DB_OS_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _spawn(state: StackState, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    chown_to_db_user(log.parent)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(log.parent), start_new_session=True, **_db_user_kwargs())
    chown_to_db_user(log)
    start = None
    deadline = time.monotonic() + 5
    while start is None and time.monotonic() < deadline:
        start = _start_time(proc.pid)
        if start is None:
            time.sleep(0.01)
    record = Proc(name=name, pid=proc.pid, start=start or "", argv=argv)
    state.processes[name] = record
    state.save()
    return record


def _base_env(state: StackState) -> dict[str, str]:
    # What archive_command and restore_command need from the environment the stack was started in:
    # S3 credentials and settings that the policy leaves to boto3's chain.
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "TZ", "PGVAULT_PG_BINDIR") or k.startswith("AWS_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    env["HOME"] = str(state.root)
    return env


def _signal_group(proc: Proc, sig: int) -> None:
    if proc.alive():
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _postmaster_pid(datadir: Path) -> int | None:
    try:
        first = (datadir / "postmaster.pid").read_text().splitlines()[0]
        pid = int(first)
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # Only a server of this data directory: the pid file can be stale and the pid reused.
    return pid if any(arg.decode(errors="replace") == str(datadir) for arg in cmdline) else None


def _processes_in(directory: Path) -> list[int]:
    """Processes working in directory: what a node's PostgreSQL left running there (a wal-fetch
    prefetch worker outlives the restore_command call that started it, by design)."""
    found = []
    inside = str(directory) + "/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd") + "/"
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        # In the data directory, or naming it (a prefetch worker is told its data directory).
        if cwd.startswith(inside) or any(a == str(directory) or a.startswith(inside) for a in args):
            found.append(int(entry.name))
    return found


def _wait_gone(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not check():
            return True
        time.sleep(0.1)
    return not check()


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read(1 << 20))


def run_pgvault(state: StackState, node: str, *args: str, timeout: float = 3600) -> str:
    """Run pgvault with a node's policy as the database OS user, as archive_command does: what it
    writes to a directory repository stays writable by the archiver. Its stdout; PgvaultError on failure."""
    from pgvault.pg.instance import as_db_user

    argv = as_db_user([state.variables()["STACK_PGVAULT"], "--config", str(state.node_policy(node)), *args])
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_base_env(state))
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.startswith(("error:", "hint:"))]
        raise PgvaultError(f"pgvault {args[0]} on {node} failed: " + (" ".join(lines) or run.stderr.strip()[-400:]))
    return run.stdout


# ---- the stack -----------------------------------------------------------------------------------------

class LocalStack:
    """Start, inspect and stop the local stack in one directory."""

    def __init__(self, root: Path, scope: str, progress: Progress = _quiet) -> None:
        self.root = root.absolute()
        self.scope = scope
        self.progress = progress

    def state(self) -> StackState | None:
        return StackState.load(self.root)

    def require_state(self) -> StackState:
        state = self.state()
        if state is None:
            raise UsageError(f"no local stack in {self.root}", hint="start one with pgvault stack up")
        return state

    # -- up ---------------------------------------------------------------------------------------

    def up(self, policy_source: Path | None, timeout: float = 180) -> dict[str, Any]:
        """Start whatever is not running; wait for a leader, two streaming replicas and working endpoints."""
        clock = time.monotonic()
        state = self.state()
        if state is None:
            for program in ("etcd", "haproxy", "pgbouncer"):
                _program(program)
            _venv_program("patroni")
            self.root.mkdir(parents=True, exist_ok=True)
            state = StackState.allocate(self.scope, self.root, str(policy_source) if policy_source else None)
            state.save()
        elif state.scope != self.scope:
            raise UsageError(f"{self.root} holds the stack of scope {state.scope!r}, not {self.scope!r}",
                             hint="use another --dir, or the policy of that stack")
        secrets = stack_secrets(self.root)
        source = Path(state.policy_source) if state.policy_source else None
        write_node_policies(state, source)
        self._render(state, secrets)
        chown_to_db_user(self.root)
        for name in ("secrets/stack.env", "secrets/pgpass"):
            os.chmod(self.root / name, 0o600)

        for etcd in ETCDS:
            self._start(state, etcd, lambda e=etcd: self._etcd_argv(state, e))
        self._wait(lambda: self._etcd_healthy(state), timeout, "etcd to have three healthy members")
        self.progress(f"stack: etcd healthy ({', '.join(ETCDS)})")
        for node in NODES:
            self.start_patroni(state, node, secrets)
        self._start(state, "haproxy", lambda: ([_program("haproxy"), "-db", "-f", str(self.root / "haproxy" /
                                                                                   "haproxy.cfg")], _base_env(state)))
        self._start(state, "pgbouncer", lambda: ([_program("pgbouncer"), str(self.root / "pgbouncer" /
                                                                              "pgbouncer.ini")], _base_env(state)))
        leader = self.wait_leader(state, timeout)
        self.progress(f"stack: {leader} leads")
        self._init_repository(state, leader)
        self.wait_healthy(state, timeout)
        self.wait_writable(state, timeout)
        self.wait_readable(state, timeout)
        self.progress(f"stack: up after {time.monotonic() - clock:.1f} s")
        return self.status()

    def _render(self, state: StackState, secrets: Mapping[str, str]) -> None:
        for etcd in ETCDS:
            write_rendered("etcd.env", state.variables(etcd=etcd), self.root / etcd / "etcd.env")
            (self.root / etcd / "data").mkdir(mode=0o700, exist_ok=True)
        for node in NODES:
            write_rendered("patroni.yml", state.variables(node=node), state.patroni_config(node))
            (state.node_dir(node) / "run").mkdir(mode=0o700, exist_ok=True)
        write_rendered("haproxy.cfg", state.variables(), self.root / "haproxy" / "haproxy.cfg")
        pgb = state.variables() | {"STACK_RUN_DIR": str(self.root / "pgbouncer" / "run")}
        write_rendered("pgbouncer.ini", pgb, self.root / "pgbouncer" / "pgbouncer.ini")
        write_rendered("pgbouncer.users", pgb | {"POSTGRES_PASSWORD": secrets["POSTGRES_PASSWORD"]},
                       self.root / "pgbouncer" / "run" / "pgbouncer.users")

    def _etcd_argv(self, state: StackState, etcd: str) -> tuple[list[str], dict[str, str]]:
        env = _base_env(state) | parse_env_file((self.root / etcd / "etcd.env").read_text())
        return [_program("etcd")], env

    def patroni_argv(self, state: StackState, node: str,
                     secrets: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        env = _base_env(state) | {
            "PATRONI_SUPERUSER_PASSWORD": secrets["POSTGRES_PASSWORD"],
            "PATRONI_REPLICATION_PASSWORD": secrets["REPLICATION_PASSWORD"],
        }
        return [_venv_program("patroni"), str(state.patroni_config(node))], env

    def start_patroni(self, state: StackState, node: str, secrets: Mapping[str, str]) -> None:
        self._start(state, node, lambda: self.patroni_argv(state, node, secrets))

    def _start(self, state: StackState, name: str,
               make: Callable[[], tuple[list[str], dict[str, str]]]) -> None:
        running = state.processes.get(name)
        if running is not None and running.alive():
            return
        argv, env = make()
        log_dir = self.root / name if name in (*ETCDS, *NODES, "haproxy", "pgbouncer") else self.root
        _spawn(state, name, argv, env, log_dir / f"{name}.log")
        self.progress(f"stack: started {name}")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, state: StackState | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            self._check_processes(state or self.state())
            time.sleep(0.5)
        raise PgvaultError(f"the stack did not come up: waited {timeout:.0f} s for {what}",
                           hint=f"see the logs under {self.root} (etcd*/, pg*/patroni.log, haproxy/, pgbouncer/)")

    def _check_processes(self, state: StackState | None) -> None:
        if state is None:
            return
        for name, proc in state.processes.items():
            if not proc.alive():
                log = self.root / name / f"{name}.log"
                tail = ""
                with suppress(OSError):
                    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise PgvaultError(f"{name} exited while the stack was starting: {tail[-600:]}",
                                   hint=f"its log is {log}")

    def _etcd_healthy(self, state: StackState) -> bool:
        for etcd in ETCDS:
            try:
                if str(_http_json(f"http://{HOST}:{state.ports[f'{etcd}_client']}/health").get("health")) != "true":
                    return False
            except (OSError, ValueError):
                return False
        return True

    def members(self, state: StackState) -> list[dict[str, Any]]:
        for url in state.rest_urls():
            try:
                data = _http_json(url + "/cluster")
                return list(data.get("members", []))
            except (OSError, ValueError):
                continue
        return []

    def leader(self, state: StackState) -> str | None:
        for member in self.members(state):
            if member.get("role") == "leader" and member.get("state") == "running":
                return str(member["name"])
        return None

    def wait_leader(self, state: StackState, timeout: float) -> str:
        found: list[str] = []

        def ready() -> bool:
            leader = self.leader(state)
            if leader:
                found.append(leader)
            return leader is not None

        self._wait(ready, timeout, "a Patroni leader", state)
        return found[-1]

    def healthy(self, state: StackState, replicas: int = 2) -> bool:
        members = self.members(state)
        leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
        streaming = [m for m in members if m.get("role") in ("replica", "sync_standby")
                     and m.get("state") == "streaming"]
        if len(leaders) != 1 or len(streaming) < replicas:
            return False
        timeline = leaders[0].get("timeline")
        return all(m.get("timeline") == timeline for m in streaming)

    def wait_healthy(self, state: StackState, timeout: float, replicas: int = 2) -> None:
        self._wait(lambda: self.healthy(state, replicas), timeout,
                   f"one leader and {replicas} streaming replicas on its timeline", state)
        self.progress(f"stack: one leader and {replicas} streaming replicas")

    def _writable(self, state: StackState) -> bool:
        import psycopg

        for port_name in ("haproxy_write", "pgbouncer"):
            try:
                with psycopg.connect(state.conninfo(port_name), connect_timeout=3, autocommit=True) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is None or row[0]:
                    return False
            except psycopg.Error:
                return False
        return True

    def wait_writable(self, state: StackState, timeout: float) -> None:
        self._wait(lambda: self._writable(state), timeout, "writes through HAProxy and PgBouncer", state)
        self.progress("stack: writes work through HAProxy and PgBouncer")

    def _reads_on_replica(self, state: StackState) -> bool:
        import psycopg

        try:
            with psycopg.connect(state.conninfo("haproxy_read"), connect_timeout=3, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])

    def wait_readable(self, state: StackState, timeout: float) -> None:
        """HAProxy marks a replica up only after its checks pass twice: until then reads go to the leader."""
        self._wait(lambda: self._reads_on_replica(state), timeout, "reads through HAProxy to reach a replica", state)
        self.progress("stack: reads through HAProxy reach a replica")

    def _init_repository(self, state: StackState, leader: str) -> None:
        """Bind the repository to the cluster (idempotent), then wake the archiver, which has been
        failing since initdb because the repository did not know the cluster yet."""
        import psycopg

        out = run_pgvault(state, leader, "init")
        self.progress("stack: " + (out.strip().splitlines() or ["repository ready"])[-1])
        with psycopg.connect(state.conninfo(f"{leader}_pg"), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT pg_switch_wal()")

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.require_state()
        members = self.members(state)
        processes = {name: {"pid": p.pid, "running": p.alive()} for name, p in state.processes.items()}
        return {
            "runtime": "local", "scope": state.scope, "dir": str(self.root),
            "members": [{"name": m.get("name"), "role": m.get("role"), "state": m.get("state"),
                         "timeline": m.get("timeline"), "lag": m.get("lag"), "host": m.get("host"),
                         "port": m.get("port")} for m in members],
            "leader": next((m.get("name") for m in members if m.get("role") == "leader"), None),
            "processes": processes,
            "endpoints": state.endpoints(),
        }

    # -- down -------------------------------------------------------------------------------------

    def stop_patroni(self, state: StackState, node: str, timeout: float = 90) -> None:
        """Stop one node's Patroni and its PostgreSQL (Patroni shuts it down; a server left behind is
        stopped fast, then immediately)."""
        proc = state.processes.get(node)
        if proc is not None:
            _signal_group(proc, signal.SIGTERM)
            if not _wait_gone(proc.alive, timeout):
                _signal_group(proc, signal.SIGKILL)
                _wait_gone(proc.alive, 10)
        state.processes.pop(node, None)
        state.save()
        datadir = state.data_dir(node)
        for sig, wait in ((signal.SIGINT, 60.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            pid = _postmaster_pid(datadir)
            if pid is None:
                break
            with suppress(ProcessLookupError):
                os.kill(pid, sig)  # SIGINT: fast shutdown; SIGQUIT: immediate
            _wait_gone(lambda: _postmaster_pid(datadir) is not None, wait)
        if _postmaster_pid(datadir) is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _processes_in(datadir):
                    with suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                if _wait_gone(lambda: bool(_processes_in(datadir)), 5):
                    break

    def down(self, timeout: float = 90) -> dict[str, Any]:
        state = self.require_state()
        stopped = []
        for name in ("pgbouncer", "haproxy"):
            proc = state.processes.get(name)
            if proc is not None and proc.alive():
                _signal_group(proc, signal.SIGTERM)
                if not _wait_gone(proc.alive, 10):
                    _signal_group(proc, signal.SIGKILL)
                stopped.append(name)
        # Replicas first, the leader last: no failover churn while the stack goes down.
        leader = self.leader(state)
        for node in sorted(NODES, key=lambda n: n == leader):
            was_running = (p := state.processes.get(node)) is not None and p.alive()
            self.stop_patroni(state, node, timeout)
            if was_running:
                stopped.append(node)
        for etcd in ETCDS:
            proc = state.processes.get(etcd)
            if proc is not None and proc.alive():
                _signal_group(proc, signal.SIGTERM)
                if not _wait_gone(proc.alive, 15):
                    _signal_group(proc, signal.SIGKILL)
                stopped.append(etcd)
        left = [name for name, p in state.processes.items() if p.alive()]
        left += [f"postgres of {n}" for n in NODES if _postmaster_pid(state.data_dir(n)) is not None]
        if left:
            raise PgvaultError(f"processes of the stack still run: {', '.join(left)}",
                               hint="stop them by hand (kill), then run pgvault stack down again")
        state.processes = {}
        state.save()
        self.progress(f"stack: stopped {', '.join(stopped) if stopped else 'nothing (nothing was running)'}")
        return {"runtime": "local", "dir": str(self.root), "stopped": stopped}

    def purge(self) -> None:
        state = self.state()
        if state is not None and any(p.alive() for p in state.processes.values()):
            raise UsageError("the stack is running", hint="run pgvault stack down first")
        shutil.rmtree(self.root, ignore_errors=True)
