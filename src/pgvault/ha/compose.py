"""The compose runtime of the HA stack: `docker compose` commands for compose/docker-compose.yml.

`pgvault stack up|down|status --runtime compose` run here. The commands are the ones an operator
would type (`docker compose -f FILE [--env-file FILE] -p PROJECT ...`), so that what pgvault does
can be repeated, inspected and undone by hand. The endpoints come from the ports the compose file
publishes, read with the same variables compose interpolates them with (the env file, then the
process environment), not from the running containers: status names them even when the stack is
down. No secret is ever printed or put on a command line: the env file is read for the ports and
the project name, and a failing command's stderr is shown with the values of secret-looking
variables masked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgvault.errors import PgvaultError, UsageError
from pgvault.redaction import redact

COMPOSE_FILE = "docker-compose.yml"
DEFAULT_PROJECT = "yieldsensei"
# `up` builds the node image before it starts waiting; a first build (apt, pip) takes minutes and
# is not part of the caller's timeout, which bounds the wait for healthy services.
BUILD_ALLOWANCE_S = 1800.0
DOWN_TIMEOUT_S = 300.0  # every container stops within its stop_grace_period (at most 120 s)
STATUS_TIMEOUT_S = 60.0
STDERR_LINES = 12
_LOCAL = "or run the stack as local processes: pgvault stack up --runtime local"
# What docker prints when the problem is docker itself, and what to do about it.
_DOCKER_PROBLEMS = (
    # `docker compose ...` without the compose plugin (docker 28 takes -f for one of its own flags).
    (("is not a docker command", "unknown command", "unknown shorthand flag"),
     f"install the docker compose plugin (docker compose v2), {_LOCAL}"),
    (("Cannot connect to the Docker daemon",), f"start the docker engine (systemctl start docker), {_LOCAL}"),
    (("permission denied while trying to connect to the Docker daemon",),
     f"run as a user in the docker group, {_LOCAL}"),
)
_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # what docker compose accepts as a project name
_SECRET_NAME_RE = re.compile(r"PASS|SECRET|TOKEN|WEBHOOK|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Compose's interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}.
_VARIABLE_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")

# The services and container ports behind each endpoint (docker-compose.yml's names).
NODES = ("pg1", "pg2", "pg3")
PATRONI_PORT = 8008


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads an env file: comments, blank lines, `export `, quotes."""
    result: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[key] = value
    return result


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's ${VAR} forms; an unset variable without a default is empty, as compose makes it."""

    def value(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        current = variables.get(name)
        if op in (":-", ":?"):
            return current if current else (arg if op == ":-" else "")
        if op in ("-", "?"):
            return current if current is not None else (arg if op == "-" else "")
        return current or ""

    return _VARIABLE_RE.sub(value, text)


def parse_ps(text: str) -> list[dict[str, Any]]:
    """`docker compose ps --format json`: one object per line (compose 2.21 and later) or one array
    (older). Returns [{"name": service, "state", "health"}], sorted by name; ValueError if not JSON."""
    text = text.strip()
    if not text:
        return []
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                             if line.strip()]
    services = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("an entry is not a JSON object")
        services.append({
            "name": str(item.get("Service") or item.get("Name") or ""),
            "state": str(item.get("State") or "").lower() or None,
            "health": str(item.get("Health") or "").lower() or None,  # "" when there is no healthcheck
        })
    return sorted(services, key=lambda s: s["name"])


def _port_entry(entry: Any, variables: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(host address, published port, container port) of one `ports:` entry; None when the host
    port is not fixed (no published port, or a range)."""
    if isinstance(entry, dict):
        host = interpolate(str(entry.get("host_ip") or ""), variables)
        published = interpolate(str(entry.get("published") or ""), variables)
        target = interpolate(str(entry.get("target") or ""), variables)
    else:
        spec = interpolate(str(entry), variables).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) < 2:
            return None
        host = parts[0] if len(parts) == 3 else ""
        published, target = parts[-2], parts[-1]
    if not (published.isdigit() and target.isdigit()):
        return None
    return host.strip("[]"), int(published), int(target)


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a port published on host."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ComposeRuntime:
    """The stack as a docker compose project; every method runs `docker compose` and returns a dict."""

    def __init__(self, compose_dir: Path, *, project: str | None = None, docker: str = "docker",
                 env_file: Path | None = None) -> None:
        self.compose_dir = Path(compose_dir).absolute()
        self.compose_file = self.compose_dir / COMPOSE_FILE
        self.env_file = Path(env_file).absolute() if env_file is not None else None
        self.docker = docker
        # The same precedence as compose: the process environment, then the env file.
        self.project = project or self.variables().get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT
        if not _PROJECT_RE.match(self.project):
            raise UsageError(f"{self.project!r} is not a docker compose project name",
                             hint="use lowercase letters, digits, '-' and '_', starting with a letter or digit")

    # -- commands -----------------------------------------------------------------------------------

    def compose_command(self, *args: str) -> list[str]:
        command = [self.docker, "compose", "-f", str(self.compose_file)]
        if self.env_file is not None:
            command += ["--env-file", str(self.env_file)]
        return [*command, "-p", self.project, *args]

    def up(self, timeout: float) -> dict[str, Any]:
        """Build the image, start every service and wait until each is healthy (or running, if it
        has no healthcheck) for at most timeout seconds; then the status."""
        wait = max(1, math.ceil(timeout))
        self._run(self.compose_command("up", "-d", "--build", "--wait", "--wait-timeout", str(wait)),
                  timeout=wait + BUILD_ALLOWANCE_S)
        return self.status()

    def down(self) -> dict[str, Any]:
        """Stop and remove the containers and the network. The named volumes (data, etcd, the
        repository) are kept: `docker compose down -v` by hand removes them."""
        before = self._services()
        self._run(self.compose_command("down"), timeout=DOWN_TIMEOUT_S)
        return {"runtime": "compose", "project": self.project, "stopped": [s["name"] for s in before]}

    def status(self) -> dict[str, Any]:
        return {"runtime": "compose", "project": self.project, "services": self._services(),
                "endpoints": self.endpoints()}

    def _services(self) -> list[dict[str, Any]]:
        # --all: a service whose container exited (crashed, or stopped by hand) shows as exited
        # rather than not at all.
        command = self.compose_command("ps", "--all", "--format", "json")
        out = self._run(command, timeout=STATUS_TIMEOUT_S)
        try:
            return parse_ps(out)
        except ValueError as exc:  # json.JSONDecodeError is one
            raise PgvaultError(f"cannot read the output of `{shlex.join(command)}`: {exc}",
                               hint="pgvault needs docker compose v2 (`docker compose version`)") from None

    # -- endpoints ----------------------------------------------------------------------------------

    def variables(self) -> dict[str, str]:
        """The variables compose interpolates the file with: the env file (--env-file, else .env
        next to the compose file), overridden by the process environment."""
        path = self.env_file or self.compose_dir / ".env"
        try:
            found = read_env_file(path) if path.is_file() else {}
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        return found | dict(os.environ)

    def published(self) -> dict[tuple[str, int], tuple[str, int]]:
        """(service, container port) -> (address for a local client, host port), from the file."""
        import yaml

        try:
            spec = yaml.safe_load(self.compose_file.read_text())
        except FileNotFoundError:
            raise UsageError(f"no {COMPOSE_FILE} in {self.compose_dir}",
                             hint="pass --compose-dir, the compose/ directory of a pgvault checkout") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read {self.compose_file}: {exc}") from None
        services = spec.get("services") if isinstance(spec, dict) else None
        if not isinstance(services, dict):
            raise UsageError(f"{self.compose_file} has no services")
        variables = self.variables()
        found = {}
        for name, service in services.items():
            for entry in (service or {}).get("ports") or []:
                port = _port_entry(entry, variables)
                if port is not None:
                    host, published, target = port
                    found[(name, target)] = (_client_host(host), published)
        return found

    def endpoints(self) -> dict[str, Any]:
        """Connection strings and URLs of the published ports; no passwords (they are in .env)."""
        ports = self.published()
        endpoints: dict[str, Any] = {}

        def add(key: str, service: str, target: int, form: str) -> None:
            if (service, target) in ports:
                host, port = ports[(service, target)]
                endpoints[key] = form.format(host=host, url_host=_url_host(host), port=port)

        add("write", "haproxy", 5432, "host={host} port={port}")
        add("read", "haproxy", 5433, "host={host} port={port}")
        add("pgbouncer", "pgbouncer", 6432, "host={host} port={port}")
        add("haproxy_stats", "haproxy", 8404, "http://{url_host}:{port}/")
        add("metrics", "postgres-exporter", 9187, "http://{url_host}:{port}/metrics")
        add("prometheus", "prometheus", 9090, "http://{url_host}:{port}/")
        patroni = {}
        for node in NODES:
            if (node, PATRONI_PORT) in ports:
                host, port = ports[(node, PATRONI_PORT)]
                patroni[node] = f"http://{_url_host(host)}:{port}"
        if patroni:
            endpoints["patroni"] = patroni
        return endpoints

    # -- running docker -----------------------------------------------------------------------------

    def _run(self, command: list[str], *, timeout: float) -> str:
        shown = shlex.join(command)
        if shutil.which(self.docker) is None:
            raise PgvaultError(f"{self.docker} not found: the compose runtime runs `{shown}`",
                               hint=f"install Docker with the compose plugin, {_LOCAL}")
        # Its own process group: on a timeout, the compose plugin docker started goes too.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise PgvaultError(f"`{shown}` did not finish within {timeout:.0f} s; stopped it",
                               hint=f"see what the services do: {self._logs_hint()}") from None
        if proc.returncode != 0:
            lines = [line for line in err.splitlines() if line.strip()]
            for signs, fix in _DOCKER_PROBLEMS:
                # docker's own complaint, not the usage text it prints after it
                said = [line for line in lines if any(sign in line for sign in signs)]
                if said:
                    lines, hint = said[:1], fix
                    break
            else:
                lines, hint = lines[-STDERR_LINES:], f"see what the services do: {self._logs_hint()}"
            detail = self._mask("\n".join(lines))
            failed = f"`{shown}` failed with exit code {proc.returncode}"
            raise PgvaultError(f"{failed}:\n{detail}" if detail else failed, hint=hint)
        return out

    def _logs_hint(self) -> str:
        return shlex.join(self.compose_command("logs", "--tail", "50"))

    def _mask(self, text: str) -> str:
        """The values of secret-looking variables (from .env or the environment) replaced by ***."""
        try:
            variables = self.variables()
        except PgvaultError:
            variables = dict(os.environ)
        secrets = sorted({v for k, v in variables.items() if _SECRET_NAME_RE.search(k) and len(v) >= 4},
                         key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, "***")
        return redact(text)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
