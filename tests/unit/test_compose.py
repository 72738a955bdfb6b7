"""The compose deployment (compose/): the file docker compose reads, what its entrypoint renders and
runs, and the `docker compose` commands ComposeRuntime issues.

No docker engine runs on this machine, so no container starts here. What is real: Debian's
docker-compose 1.29 (`config` needs no engine) validates and resolves the compose file with
.env.example; pgvault's renderer renders every template with the environment each service gets;
`haproxy -c`, `patroni --validate-config` and a short-lived pgbouncer check the rendered files;
bash runs compose/entrypoint.sh with the real `pgvault stack render` (the programs it finally
execs are stand-ins that record how they were called). ComposeRuntime runs against a fake `docker`
executable on PATH (a script that records its argv and prints canned `ps` output), because there is
no docker engine here to run the real one against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgvault.config import load_policy
from pgvault.errors import PgvaultError, UsageError
from pgvault.ha import compose as compose_mod
from pgvault.ha.compose import ComposeRuntime, parse_ps
from pgvault.ha.render import TEMPLATES, placeholders, render
from pgvault.pg.instance import as_db_user, chown_to_db_user, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE / ".env.example"
ENTRYPOINT = COMPOSE / "entrypoint.sh"
DOCKER_COMPOSE_V1 = "/usr/bin/docker-compose"
VENV_BIN = Path(sys.executable).parent

NODES = ("pg1", "pg2", "pg3")
SCHEDULERS = ("pgvault-scheduler1", "pgvault-scheduler2", "pgvault-scheduler3")
SERVICES = {"etcd1", "etcd2", "etcd3", *NODES, "haproxy", "pgbouncer", "postgres-exporter", "prometheus",
            *SCHEDULERS}
# Names of variables that hold secrets (DATA_SOURCE_PASS is the exporter's password).
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|WEBHOOK|ACCESS_KEY", re.IGNORECASE)


def _clean_env(**extra: str) -> dict[str, str]:
    """No variable of this shell reaches compose's interpolation: only the env file counts."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"), **extra}


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    if not Path(DOCKER_COMPOSE_V1).exists():
        pytest.fail("docker-compose 1.29 (Debian's docker-compose package) is not installed: scripts/setup installs it")
    return subprocess.run([DOCKER_COMPOSE_V1, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env=_clean_env(), timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker compose resolves it with .env.example."""
    result = compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, Any]:
    return resolved["services"]


def env_example() -> dict[str, str]:
    return compose_mod.read_env_file(ENV_EXAMPLE)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a volume's name or a host path)."""
    result = {}
    for entry in service.get("volumes") or []:
        source, target = entry.split(":")[:2] if isinstance(entry, str) else (entry["source"], entry["target"])
        result[target] = source
    return result


def policy_of(services: dict[str, Any], name: str) -> Any:
    """The pgvault policy a service runs with: PGVAULT_CONFIG, read through the service's mounts."""
    path = Path(service_env(services[name])["PGVAULT_CONFIG"])
    source = mounts(services[name])[str(path.parent)]
    return load_policy(Path(source) / path.name)


# ---- (a) the compose file ---------------------------------------------------------------------------

def test_the_compose_file_has_every_service_of_the_stack(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_client_and_operator_ports_are_published_on_loopback_by_default(services: dict[str, Any]) -> None:
    published = {(name, entry) for name, service in services.items() for entry in service.get("ports") or []}
    for service, port in [("haproxy", 5432), ("haproxy", 5433), ("haproxy", 8404), ("pgbouncer", 6432),
                          ("postgres-exporter", 9187)]:
        assert (service, f"127.0.0.1:{port}:{port}/tcp") in published
    # Each node's Patroni REST API on its own host port; nothing publishes PostgreSQL beside HAProxy.
    assert {(n, e) for n, e in published if n in NODES} == {
        ("pg1", "127.0.0.1:8008:8008/tcp"), ("pg2", "127.0.0.1:8009:8008/tcp"), ("pg3", "127.0.0.1:8010:8008/tcp")}
    assert not any(e.split(":")[-1].startswith("5432") for n, e in published if n != "haproxy")


def test_secrets_come_only_from_the_environment(services: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # anchors merged, nothing interpolated
    secret_values = [v for k, v in env_example().items() if SECRET_NAME.search(k) and v]
    assert secret_values, "the example env file has placeholder secrets"
    text = COMPOSE_FILE.read_text()
    assert not [v for v in secret_values if v in text]
    checked = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                # Required (${X:?...}) or optional and empty by default (${X:-}), never a literal.
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]+|:-)\}", str(value)), (name, key, value)
                checked += 1
    assert checked >= 10
    # ... and they do reach the containers that need them.
    password = env_example()["POSTGRES_PASSWORD"]
    for node in NODES:
        assert service_env(services[node])["PATRONI_SUPERUSER_PASSWORD"] == password
    assert service_env(services["pgbouncer"])["POSTGRES_PASSWORD"] == password
    assert service_env(services["postgres-exporter"])["DATA_SOURCE_PASS"] == password


def test_a_missing_password_stops_compose_before_anything_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = compose_config(env_file)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr
    assert env["REPLICATION_PASSWORD"] not in result.stderr + result.stdout


def test_each_scheduler_backs_up_its_own_node_and_knows_all_three(services: dict[str, Any]) -> None:
    rest_urls = [f"http://{service_env(services[n])['STACK_HOST']}:{service_env(services[n])['STACK_REST_PORT']}"
                 for n in NODES]
    node_of_config = {service_env(services[n])["STACK_PGVAULT_CONFIG"]: n for n in NODES}
    members = []
    for scheduler in SCHEDULERS:
        env = service_env(services[scheduler])
        node = node_of_config[env["PGVAULT_CONFIG"]]  # the node whose archive_command uses this policy
        node_env = service_env(services[node])
        policy = policy_of(services, scheduler)
        assert policy.schedule.member == node_env["STACK_NODE"]
        assert f"host={node_env['STACK_HOST']} port={node_env['STACK_PG_PORT']} " in policy.postgres.conninfo + " "
        assert policy.schedule.patroni_urls == rest_urls
        assert node in services[scheduler]["depends_on"]
        assert env["PGPASSWORD"] == env_example()["POSTGRES_PASSWORD"]
        members.append(policy.schedule.member)
    assert sorted(members) == sorted(set(members)) == list(NODES)


def test_node_policies_differ_only_in_the_node_they_belong_to(services: dict[str, Any]) -> None:
    dumps = []
    for node in NODES:
        env = service_env(services[node])
        assert env["PGVAULT_CONFIG"] == env["STACK_PGVAULT_CONFIG"]
        data = policy_of(services, node).model_dump(mode="json")
        data["postgres"].pop("conninfo")
        data["schedule"].pop("member")
        dumps.append(data)
    assert dumps[0] == dumps[1] == dumps[2]
    # The scope Patroni registers in etcd is the cluster's name in the repository.
    assert {service_env(services[n])["STACK_SCOPE"] for n in NODES} == {dumps[0]["cluster"]}


def test_nodes_and_schedulers_share_the_repository_and_keep_their_own_data(services: dict[str, Any]) -> None:
    repository = str(policy_of(services, "pg1").repository.path)
    volumes = {name: mounts(services[name]) for name in (*NODES, *SCHEDULERS)}
    assert {m[repository] for m in volumes.values()} == {"pgvault-repo"}
    data = {mounts(services[n])[str(Path(service_env(services[n])["STACK_DATA_DIR"]).parent)] for n in NODES}
    assert len(data) == 3
    assert all(not v.startswith("/") for v in data)  # named volumes, not host directories


def test_prometheus_scrapes_the_exporter_and_every_scheduler_and_loads_the_alert_rules(
        services: dict[str, Any]) -> None:
    config_dir = Path(mounts(services["prometheus"])["/etc/prometheus"])
    prometheus = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        assert yaml.safe_load((config_dir / rule_file).read_text())["groups"]
    assert "alerts.yml" in prometheus["rule_files"]
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "postgres-exporter:9187" in targets
    for scheduler in SCHEDULERS:
        port = policy_of(services, scheduler).schedule.metrics_listen.rsplit(":", 1)[1]
        assert f"{scheduler}:{port}" in targets
    assert {t.split(":")[0] for t in targets} - {"localhost"} <= SERVICES


def test_the_node_image_is_built_from_the_repository_root(services: dict[str, Any]) -> None:
    built = {name for name, s in services.items() if "build" in s}
    assert built == SERVICES - {"postgres-exporter", "prometheus"}
    for name in built:
        assert Path(services[name]["build"]["context"]) == ROOT
        assert services[name]["build"]["dockerfile"] == "compose/Dockerfile"
    assert (COMPOSE / "config").resolve() == (ROOT / "src/pgvault/ha/templates").resolve()


# ---- (b) what the entrypoint renders -------------------------------------------------------------------

def entrypoint_roles() -> dict[str, list[str]]:
    """role -> the templates its branch of entrypoint.sh renders, read from the script itself."""
    roles: dict[str, list[str]] = {}
    role = None
    for line in ENTRYPOINT.read_text().splitlines():
        label = re.match(r"^    ([a-z]+)\)$", line)
        if label:
            role = label.group(1)
            roles[role] = []
        elif role and (call := re.match(r"^\s+render (\S+)", line)):
            roles[role].append(call.group(1))
    return roles


def node_image_services(services: dict[str, Any]) -> list[str]:
    return sorted(name for name, s in services.items() if "build" in s)


def test_the_entrypoint_knows_every_role_the_compose_file_runs(services: dict[str, Any]) -> None:
    roles = entrypoint_roles()
    assert set(roles) == {"etcd", "patroni", "haproxy", "pgbouncer", "scheduler"}
    assert {services[n]["command"][0] for n in node_image_services(services)} == set(roles)
    assert {t for ts in roles.values() for t in ts} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(SERVICES - {"postgres-exporter", "prometheus"}))
def test_every_template_a_service_renders_has_all_its_variables(services: dict[str, Any], name: str) -> None:
    service = services[name]
    env = service_env(service)
    for template in entrypoint_roles()[service["command"][0]]:
        assert placeholders(template) <= set(env), sorted(placeholders(template) - set(env))
        text = render(template, env)
        assert "${" not in text


def rendered(services: dict[str, Any], service: str, template: str, **overrides: str) -> str:
    return render(template, service_env(services[service]) | overrides)


def test_rendered_haproxy_config_is_valid(services: dict[str, Any], tmp_path: Path) -> None:
    # pg1..pg3 resolve only on the compose network: here they are 127.0.0.1.
    hosts = {f"STACK_NODE{i}_HOST": "127.0.0.1" for i in (1, 2, 3)}
    config = tmp_path / "haproxy.cfg"
    config.write_text(rendered(services, "haproxy", "haproxy.cfg", **hosts))
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    result = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # The checker is not lenient: the same file with a typo fails.
    config.write_text(config.read_text().replace("option httpchk", "option httpchek"))
    assert subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, timeout=30).returncode != 0


def test_rendered_patroni_config_passes_patronis_validator(services: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / "patroni.yml"
    config.write_text(rendered(services, "pg1", "patroni.yml"))
    result = subprocess.run([str(VENV_BIN / "patroni"), "--validate-config", "--ignore-listen-port", str(config)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "didn't pass validation" in line]
    # etcd1..3 exist only on the compose network; any other complaint is a real one.
    assert [p for p in problems if not p.startswith("etcd3.hosts ")] == []
    assert result.returncode in (0, 1)
    broken = yaml.safe_load(config.read_text())
    broken["bootstrap"]["dcs"]["ttl"] = "thirty"
    config.write_text(yaml.safe_dump(broken))
    result = subprocess.run([str(VENV_BIN / "patroni"), "--validate-config", "--ignore-listen-port", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert "bootstrap.dcs.ttl" in result.stdout + result.stderr


@pytest.fixture
def db_user_dir() -> Iterator[Path]:
    """A directory the postgres OS user can use (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pgvault-compose-"))
    path.chmod(0o755)
    chown_to_db_user(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_rendered_pgbouncer_config_starts_pgbouncer(services: dict[str, Any], db_user_dir: Path) -> None:
    port = free_port()
    env = service_env(services["pgbouncer"]) | {"STACK_LISTEN": "127.0.0.1", "STACK_PGBOUNCER_PORT": str(port),
                                                "STACK_RUN_DIR": str(db_user_dir)}
    for template in entrypoint_roles()["pgbouncer"]:
        (db_user_dir / template).write_text(render(template, env))
    chown_to_db_user(db_user_dir)
    proc = subprocess.Popen(as_db_user([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer",
                                        str(db_user_dir / "pgbouncer.ini")]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while not _listening(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and _listening(port), "pgbouncer did not start"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert "FATAL" not in out and "ERROR" not in out, out
    assert env_example()["POSTGRES_PASSWORD"] not in out


# ---- the entrypoint, run by bash -----------------------------------------------------------------------

STAND_IN = """#!{python}
import json, os, sys
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps({{"program": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "env": dict(os.environ)}}) + "\\n")
sys.exit(int(os.environ.get("STAND_IN_EXIT_" + os.path.basename(sys.argv[0]).upper(), "0")))
"""


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A bin directory of programs that record their argv and environment, and exit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("etcd", "patroni", "haproxy", "pgbouncer"):
        path = bin_dir / program
        path.write_text(STAND_IN.format(python=sys.executable))
        path.chmod(0o755)
    return bin_dir


def run_entrypoint(args: list[str], env: dict[str, str], bin_dirs: list[Path],
                   log: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    path = os.pathsep.join([*map(str, bin_dirs), str(VENV_BIN), "/usr/bin", "/bin"])
    result = subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=60,
                            env={**env, "PATH": path, "STAND_IN_LOG": str(log), "HOME": str(log.parent)})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.mark.parametrize(("service", "program", "argv"), [
    ("etcd1", "etcd", []),
    ("pg2", "patroni", ["{run}/patroni.yml"]),
    ("haproxy", "haproxy", ["-db", "-f", "{run}/haproxy.cfg"]),
    ("pgbouncer", "pgbouncer", ["{run}/pgbouncer.ini"]),
])
def test_the_entrypoint_renders_the_role_and_runs_its_program(services: dict[str, Any], stand_ins: Path,
                                                              tmp_path: Path, service: str, program: str,
                                                              argv: list[str]) -> None:
    run_dir = tmp_path / "run"
    env = service_env(services[service]) | {"STACK_RUN_DIR": str(run_dir)}
    result, calls = run_entrypoint(services[service]["command"], env, [stand_ins], tmp_path / "calls.log")
    assert result.returncode == 0, result.stderr
    assert [(c["program"], c["argv"]) for c in calls] == [(program, [a.format(run=run_dir) for a in argv])]
    for template in entrypoint_roles()[services[service]["command"][0]]:
        assert (run_dir / template).read_text() == render(template, env)
        mode = stat.S_IMODE((run_dir / template).stat().st_mode)
        assert mode == (0o600 if template == "pgbouncer.users" else 0o644)
    if program == "etcd":  # etcd is configured by the rendered file, exported as ETCD_* variables
        expected = compose_mod.read_env_file(run_dir / "etcd.env")
        assert expected["ETCD_NAME"] == "etcd1"
        assert {k: v for k, v in calls[0]["env"].items() if k.startswith("ETCD_")} == expected


def test_the_entrypoint_unsets_empty_aws_variables(services: dict[str, Any], stand_ins: Path,
                                                   tmp_path: Path) -> None:
    env = service_env(services["pg1"]) | {"STACK_RUN_DIR": str(tmp_path / "run"), "AWS_DEFAULT_REGION": "",
                                          "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}
    result, calls = run_entrypoint(["patroni"], env, [stand_ins], tmp_path / "calls.log")
    assert result.returncode == 0, result.stderr
    assert "AWS_DEFAULT_REGION" not in calls[0]["env"]
    assert "AWS_ENDPOINT_URL_S3" not in calls[0]["env"]  # "" in .env.example
    assert calls[0]["env"]["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"


def test_the_entrypoint_stops_on_a_missing_variable(services: dict[str, Any], stand_ins: Path,
                                                    tmp_path: Path) -> None:
    env = service_env(services["haproxy"]) | {"STACK_RUN_DIR": str(tmp_path / "run")}
    del env["STACK_NODE2_HOST"]
    result, calls = run_entrypoint(["haproxy"], env, [stand_ins], tmp_path / "calls.log")
    assert result.returncode != 0
    assert "STACK_NODE2_HOST" in result.stderr
    assert calls == []


def test_the_scheduler_role_inits_the_repository_then_runs_the_schedule(stand_ins: Path, tmp_path: Path) -> None:
    # A stand-in pgvault: init answers as told, schedule run is recorded.
    (stand_ins / "pgvault").write_text(STAND_IN.format(python=sys.executable))
    (stand_ins / "pgvault").chmod(0o755)
    result, calls = run_entrypoint(["scheduler"], {}, [stand_ins], tmp_path / "ok.log")
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in calls] == [["init"], ["schedule", "run"]]
    # A mistake in the policy (exit code 2) ends the container instead of retrying for ever.
    result, calls = run_entrypoint(["scheduler"], {"STAND_IN_EXIT_PGVAULT": "2"}, [stand_ins], tmp_path / "bad.log")
    assert result.returncode == 2
    assert [c["argv"] for c in calls] == [["init"]]


@pytest.mark.parametrize(("args", "message"), [
    (["bogus"], "unknown role 'bogus'; use one of: etcd patroni haproxy pgbouncer scheduler"),
    ([], "no role given"),
])
def test_the_entrypoint_refuses_an_unknown_role(stand_ins: Path, tmp_path: Path, args: list[str],
                                                message: str) -> None:
    result, calls = run_entrypoint(args, {}, [stand_ins], tmp_path / "calls.log")
    assert result.returncode == 2
    assert message in result.stderr
    assert calls == []


# ---- (c) ComposeRuntime against a fake docker ----------------------------------------------------------

FAKE_DOCKER = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_DOCKER_SLEEP"):
    with open(os.environ["FAKE_DOCKER_PID"], "w") as pid:
        pid.write(str(os.getpid()))
    time.sleep(float(os.environ["FAKE_DOCKER_SLEEP"]))
if os.environ.get("FAKE_DOCKER_FAIL") in args:
    sys.stderr.write(os.environ["FAKE_DOCKER_STDERR"])
    sys.exit(int(os.environ.get("FAKE_DOCKER_EXIT", "1")))
if "ps" in args:
    sys.stdout.write(open(os.environ["FAKE_DOCKER_PS"]).read())
"""

PS_ENTRIES = [
    {"Name": "yieldsensei-pg1-1", "Service": "pg1", "State": "running", "Health": "healthy",
     "Publishers": [{"URL": "127.0.0.1", "TargetPort": 8008, "PublishedPort": 8008, "Protocol": "tcp"}]},
    {"Name": "yieldsensei-haproxy-1", "Service": "haproxy", "State": "running", "Health": "starting"},
    {"Name": "yieldsensei-prometheus-1", "Service": "prometheus", "State": "running", "Health": ""},
    {"Name": "yieldsensei-pg2-1", "Service": "pg2", "State": "exited", "Health": ""},
]
PARSED = [
    {"name": "haproxy", "state": "running", "health": "starting"},
    {"name": "pg1", "state": "running", "health": "healthy"},
    {"name": "pg2", "state": "exited", "health": None},
    {"name": "prometheus", "state": "running", "health": None},
]
PS_FORMATS = {
    "one object per line": "\n".join(json.dumps(e) for e in PS_ENTRIES) + "\n",  # docker compose >= 2.21
    "one array": json.dumps(PS_ENTRIES) + "\n",  # older docker compose v2
}


class FakeDocker:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        (self.bin / "docker").write_text(FAKE_DOCKER.format(python=sys.executable))
        (self.bin / "docker").chmod(0o755)
        self.log = tmp_path / "docker.log"
        self.ps = tmp_path / "ps.json"
        self.ps.write_text(PS_FORMATS["one object per line"])
        self.pid = tmp_path / "docker.pid"
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_DOCKER_LOG", str(self.log))
        monkeypatch.setenv("FAKE_DOCKER_PS", str(self.ps))
        monkeypatch.setenv("FAKE_DOCKER_PID", str(self.pid))
        for name in ("COMPOSE_PROJECT_NAME", "BIND_ADDRESS", "ADMIN_BIND_ADDRESS", "HAPROXY_WRITE_PORT"):
            monkeypatch.delenv(name, raising=False)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    return FakeDocker(tmp_path, monkeypatch)


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "stack.env"
    path.write_text(ENV_EXAMPLE.read_text().replace("change-me-postgres-password", "Sup3r-Secret-Pw"))
    return path


def base(env_file: Path | None, project: str = "yieldsensei") -> list[str]:
    command = ["compose", "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    return [*command, "-p", project]


ENDPOINTS = {
    "write": "host=127.0.0.1 port=5432",
    "read": "host=127.0.0.1 port=5433",
    "pgbouncer": "host=127.0.0.1 port=6432",
    "haproxy_stats": "http://127.0.0.1:8404/",
    "metrics": "http://127.0.0.1:9187/metrics",
    "prometheus": "http://127.0.0.1:9090/",
    "patroni": {"pg1": "http://127.0.0.1:8008", "pg2": "http://127.0.0.1:8009", "pg3": "http://127.0.0.1:8010"},
}


def test_up_builds_starts_waits_then_reports(docker: FakeDocker, env_file: Path) -> None:
    result = ComposeRuntime(COMPOSE, env_file=env_file).up(timeout=90.5)
    assert docker.calls() == [
        [*base(env_file), "up", "-d", "--build", "--wait", "--wait-timeout", "91"],
        [*base(env_file), "ps", "--all", "--format", "json"],
    ]
    assert result == {"runtime": "compose", "project": "yieldsensei", "services": PARSED, "endpoints": ENDPOINTS}
    assert "Sup3r-Secret-Pw" not in json.dumps(result)


def test_down_keeps_the_volumes(docker: FakeDocker, env_file: Path) -> None:
    result = ComposeRuntime(COMPOSE, env_file=env_file, project="ys-test").down()
    assert docker.calls() == [
        [*base(env_file, "ys-test"), "ps", "--all", "--format", "json"],
        [*base(env_file, "ys-test"), "down"],
    ]
    assert result == {"runtime": "compose", "project": "ys-test", "stopped": ["haproxy", "pg1", "pg2", "prometheus"]}


@pytest.mark.parametrize("form", sorted(PS_FORMATS))
def test_status_reads_both_ps_formats(docker: FakeDocker, form: str) -> None:
    docker.ps.write_text(PS_FORMATS[form])
    result = ComposeRuntime(COMPOSE).status()
    # Without --env-file, compose reads .env next to the compose file by itself.
    assert docker.calls() == [[*base(None), "ps", "--all", "--format", "json"]]
    assert result["services"] == PARSED


def test_ps_without_containers_and_with_garbage() -> None:
    assert parse_ps("") == []
    assert parse_ps("[]\n") == []
    with pytest.raises(ValueError):
        parse_ps("not json")


def test_status_of_unreadable_ps_output_is_an_error(docker: FakeDocker) -> None:
    docker.ps.write_text("NAME  IMAGE  STATUS\npg1 ...\n")
    with pytest.raises(PgvaultError, match=r"cannot read the output of `docker compose .* ps --all --format json`"):
        ComposeRuntime(COMPOSE).status()


def test_endpoints_follow_the_env_file_and_the_environment(docker: FakeDocker, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("COMPOSE_PROJECT_NAME=ys2\nBIND_ADDRESS=0.0.0.0\nHAPROXY_WRITE_PORT=15432\n"
                        "ADMIN_BIND_ADDRESS='10.1.2.3'\nPATRONI2_REST_PORT=18009\n")
    monkeypatch.setenv("HAPROXY_READ_PORT", "15433")  # the environment wins over the file, as in compose
    runtime = ComposeRuntime(COMPOSE, env_file=env_file)
    assert runtime.project == "ys2"
    endpoints = runtime.endpoints()
    assert endpoints["write"] == "host=127.0.0.1 port=15432"  # published on every address: reach it locally
    assert endpoints["read"] == "host=127.0.0.1 port=15433"
    assert endpoints["haproxy_stats"] == "http://10.1.2.3:8404/"
    assert endpoints["patroni"]["pg2"] == "http://10.1.2.3:18009"
    assert docker.calls() == []  # endpoints come from the file, not from docker
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "from-env")
    assert ComposeRuntime(COMPOSE, env_file=env_file).project == "from-env"
    assert ComposeRuntime(COMPOSE, env_file=env_file, project="explicit").project == "explicit"
    with pytest.raises(UsageError, match="not a docker compose project name"):
        ComposeRuntime(COMPOSE, project="Bad Name")


def test_missing_docker_points_to_the_local_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker on it
    for runtime in (ComposeRuntime(COMPOSE), ComposeRuntime(COMPOSE, docker=str(tmp_path / "docker"))):
        with pytest.raises(PgvaultError) as caught:
            runtime.up(60)
        assert "not found" in caught.value.message
        assert caught.value.hint is not None and "--runtime local" in caught.value.hint


def test_a_failing_command_is_named_with_its_stderr_and_no_secret(docker: FakeDocker, env_file: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "up")
    monkeypatch.setenv("FAKE_DOCKER_STDERR", "".join(f"progress line {i}\n" for i in range(40)) +
                       "dependency failed to start: container yieldsensei-pg2-1 is unhealthy\n"
                       "connection to server failed: password=Sup3r-Secret-Pw\n")
    with pytest.raises(PgvaultError) as caught:
        ComposeRuntime(COMPOSE, env_file=env_file).up(timeout=30)
    message = caught.value.message
    assert message.startswith(f"`docker compose -f {COMPOSE_FILE} --env-file {env_file} -p yieldsensei "
                               "up -d --build --wait --wait-timeout 30` failed with exit code 1:")
    assert "container yieldsensei-pg2-1 is unhealthy" in message
    assert "progress line 39" in message and "progress line 0\n" not in message  # the last lines only
    assert "Sup3r-Secret-Pw" not in message + str(caught.value.hint)
    assert "logs --tail 50" in str(caught.value.hint)
    assert [c[-1] for c in docker.calls()] == ["30"]  # no status after a failed up


@pytest.mark.parametrize(("stderr", "code", "fix"), [
    # docker 28 without the compose plugin (as installed on this machine), and older dockers.
    ("unknown shorthand flag: 'f' in -f\n\nUsage:  docker [OPTIONS] COMMAND [ARG...]\n\nRun 'docker --help' for "
     "more information\n", 125, "compose plugin"),
    ("docker: 'compose' is not a docker command.\n", 1, "compose plugin"),
    ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n", 1,
     "start the docker engine"),
])
def test_problems_of_docker_itself_get_their_own_hint(docker: FakeDocker, monkeypatch: pytest.MonkeyPatch,
                                                      stderr: str, code: int, fix: str) -> None:
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "ps")
    monkeypatch.setenv("FAKE_DOCKER_EXIT", str(code))
    monkeypatch.setenv("FAKE_DOCKER_STDERR", stderr)
    with pytest.raises(PgvaultError) as caught:
        ComposeRuntime(COMPOSE).status()
    assert caught.value.message.endswith(f"failed with exit code {code}:\n{stderr.splitlines()[0]}")
    assert fix in str(caught.value.hint) and "--runtime local" in str(caught.value.hint)


def test_a_hanging_command_is_stopped(docker: FakeDocker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DOCKER_SLEEP", "60")
    monkeypatch.setattr(compose_mod, "STATUS_TIMEOUT_S", 1.0)
    started = time.monotonic()
    with pytest.raises(PgvaultError, match=r"ps --all --format json` did not finish within 1 s"):
        ComposeRuntime(COMPOSE).status()
    assert time.monotonic() - started < 20
    pid = int(docker.pid.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
