"""The stack's configuration templates: one set of files, rendered for the local runtime and for compose.

The templates (pgvault/ha/templates/, linked from compose/config) use ${STACK_*} placeholders
(string.Template syntax). `pgvault stack up` renders them with the ports and directories of its
local processes; the node image's entrypoint (`pgvault stack render`) renders them from the
container's environment. A placeholder without a value is an error naming it, never an empty string.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from pgvault.errors import UsageError

TEMPLATES = ("etcd.env", "patroni.yml", "haproxy.cfg", "pgbouncer.ini", "pgbouncer.users")
# Rendered files holding a secret: written 0600.
SECRET_TEMPLATES = frozenset({"pgbouncer.users"})


def template_text(name: str) -> str:
    if name not in TEMPLATES:
        raise UsageError(f"unknown stack template {name!r}", hint="one of: " + ", ".join(TEMPLATES))
    return resources.files("pgvault.ha").joinpath("templates", name).read_text()


def placeholders(name: str) -> set[str]:
    """The variable names a template uses."""
    found = set()
    for match in string.Template.pattern.finditer(template_text(name)):
        named = match.group("named") or match.group("braced")
        if named:
            found.add(named)
    return found


def render(name: str, variables: Mapping[str, str]) -> str:
    missing = sorted(placeholders(name) - set(variables))
    if missing:
        raise UsageError(f"stack template {name} needs {', '.join(missing)}",
                         hint="set them in the environment (see compose/.env.example)")
    return string.Template(template_text(name)).substitute(variables)


def write_rendered(name: str, variables: Mapping[str, str], path: Path) -> Path:
    """Render a template to path (0600 for secret files, else 0644), replacing it atomically."""
    text = render(name, variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = 0o600 if name in SECRET_TEMPLATES else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines (as etcd.env renders), comments and blank lines skipped."""
    result = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            result[key.strip()] = value.strip()
    return result
