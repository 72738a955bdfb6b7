"""Helpers the benchmark scripts share: the venv's console scripts, logging, a work directory the
database OS user owns, moto_server on loopback, and running a command in a process group of its own.

The scripts run as `.venv/bin/python bench/<script>.py`, so this directory is on sys.path and they
import it as `benchlib`. Standard library only at import time (proctree, which uses the process-group
runner, stays standard library only).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The venv's bin directory next to this interpreter, by its real path (the postgres user can reach the venv).
VENV_BIN = Path(sys.executable).parent.resolve()
PGVAULT = str(VENV_BIN / "pgvault")
MOTO_SERVER = str(VENV_BIN / "moto_server")


class Interrupted(Exception):
    """SIGTERM, turned into an exception so every cleanup runs."""


def raise_interrupted(signum: int, _frame: Any) -> None:
    """A signal handler (for SIGTERM): raise Interrupted."""
    raise Interrupted(f"signal {signum}")


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM in the body: a second Ctrl-C or SIGTERM must not cut a cleanup short."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_workdir() -> Path:
    """A temp dir the database OS user owns (tests/conftest.py's make_workdir)."""
    # Imported here so that importing benchlib needs no pgvault (see the module docstring).
    from pgvault.pg.instance import chown_to_db_user

    path = Path(tempfile.mkdtemp(prefix="pgvault-bench-", dir="/tmp"))
    os.chmod(path, 0o755)
    chown_to_db_user(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:port; RuntimeError if proc exits first or
    the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.1)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto_server on 127.0.0.1 for the run (as tests/repos.py MotoServer); yields its URL."""
    port = free_port()
    proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port, proc, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def process_group(cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    """Start cmd from /tmp in a session (process group) of its own, stdout and stderr piped as text.

    If the body raises anything (a timeout, Ctrl-C, SIGTERM turned into an exception), the whole group
    is killed and reaped before the exception goes on: runuser and whatever the command started die
    with it instead of running on behind the benchmark.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            start_new_session=True)
    try:
        yield proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def run(cmd: list[str], *, what: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run cmd in its own process group; on any interruption kill that whole group, then re-raise."""
    with process_group(cmd) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stdout}{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
