"""Every command explains itself with an example; --version and --debug behave."""

from __future__ import annotations

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
