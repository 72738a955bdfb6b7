"""Every command explains itself with an example; --version and --debug behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgvault import __version__
from pgvault.cli import cli

COMMANDS = sorted(cli.commands)


def test_the_commands_the_interface_promises_exist() -> None:
    assert {"init", "check", "wal-push", "wal-fetch", "backup", "list", "info", "restore", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "pgvault" in result.output.split("Example:", 1)[1]


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_wal_prefetch_clean_names_a_missing_policy_file(tmp_path: Path) -> None:
    # recovery_end_command with a wrong --config: a one-line error and exit 2, not a silent success.
    # Through the console script's entry point, which maps errors to exit codes (and has a fast path
    # for this command that must hand a missing file to the CLI).
    result = subprocess.run([sys.executable, "-m", "pgvault", "--config", str(tmp_path / "missing.yaml"),
                             "wal-prefetch", "--clean"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0].endswith("missing.yaml does not exist")
    assert "Traceback" not in result.stderr
