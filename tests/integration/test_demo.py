"""The README's first command: `pgvault demo` runs the whole job and leaves nothing behind."""

from __future__ import annotations

import glob

from conftest import run_pgvault


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
