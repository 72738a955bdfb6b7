"""The README's first command: `pgvault demo` runs the whole job and leaves nothing behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import pytest
from conftest import PGVAULT, kill_group, run_pgvault


def test_demo_restores_exactly_the_rows_before_its_target_and_cleans_up() -> None:
    before = set(glob.glob("/tmp/pgvault-demo-*"))
    result = run_pgvault("demo")
    assert result.returncode == 0, result.out
    assert "OK: the restore holds exactly the rows committed before the target" in result.stdout
    # Batches 1-3 before the target, 4-5 after: the table in the output shows exactly that.
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[-2], row[-1]) for row in lines] == [
        ("1", "1000", "1000"), ("2", "1000", "1000"), ("3", "1000", "1000"), ("4", "0", "0"), ("5", "0", "0")]
    assert set(glob.glob("/tmp/pgvault-demo-*")) == before


def _demo_postmasters() -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if "pgvault-demo-" in line and "postgres" in line]


@pytest.mark.parametrize("how", ["ctrl-c to the process group", "sigterm to pgvault"])
def test_demo_interrupted_stops_its_servers_and_removes_its_directory(how: str) -> None:
    before = set(glob.glob("/tmp/pgvault-demo-*"))
    # As root this also covers the demo re-running itself as the postgres user.
    proc = subprocess.Popen([PGVAULT, "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            start_new_session=True)
    try:
        # Interrupt once the throwaway server is up and archiving, in the middle of the job.
        deadline = time.monotonic() + 60
        while not _demo_postmasters():
            assert time.monotonic() < deadline, "the demo's server never started"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        if how.startswith("ctrl-c"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert _demo_postmasters() == []
    assert set(glob.glob("/tmp/pgvault-demo-*")) == before
