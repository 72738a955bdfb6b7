"""Peak memory of `pgvault backup` against database size.

The issue's promise: "Memory stays bounded: a backup of a database several times larger than the part
size has a peak RSS that does not grow with the database". For every size this script

  1. initdb's a throwaway cluster in a /tmp dir owned by the postgres OS user (as tests/conftest.py does),
  2. fills a database `bench` with about that many MiB: pgbench tables (pgbench -i, server-side
     generation, ~15 MiB per scale unit; very compressible) plus a table of random bytes (incompressible),
  3. turns on WAL archiving through `pgvault wal-push`, restarts, and runs `pgvault init`,
  4. runs `pgvault backup --json` in a subprocess and records the pgvault process's peak RSS
     (GNU time's %M, or ru_maxrss from wait4 in a small wrapper when /usr/bin/time is missing), its wall
     time, and the backup's parts, raw and stored size; for reference it also records the peak RSS of
     `pgvault check` on the same cluster (interpreter, imports, connection, repository: all but the stream),
  5. with --restore, runs `pgvault restore` of that backup into an empty directory and records its wall
     time and peak RSS the same way (the restored copy is not started),
  6. destroys the cluster and its directory (also on Ctrl-C or SIGTERM).

The data is loaded with wal_level=minimal and archiving off, so the load writes almost no WAL and the
backup does not wait behind an archive backlog of the load; archiving through pgvault is on, as in
production, for the backup itself.

Usage:
    .venv/bin/python bench/backup_memory.py [--sizes 64,256,1024] [--part-size 32MiB] [--restore]
        [--set backup.upload_parallel=1 ...]

Another version of pgvault (an older checkout, for a before/after) is measured by putting its `src`
first on PYTHONPATH: the pgvault commands inherit the environment (runuser keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from benchlib import PGVAULT, Interrupted, log, make_workdir, raise_interrupted, run, signals_ignored

from pgvault.config import parse_size
from pgvault.errors import PgvaultError
from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user, pg_tool

GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024
PGBENCH_MIB_PER_SCALE = 15  # pgbench_accounts + its primary key, per scale unit
NOISE_ROW_BYTES = 256  # random bytes per row of the incompressible table
NOISE_ROW_FOOTPRINT = 300  # on-disk bytes per such row, tuple header and line pointer included
DATABASE = "bench"

# Runs a command and writes its peak RSS (KiB, ru_maxrss of wait4) to argv[1]; exits with its status.
WAIT4_WRAPPER = """
import os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as handle:
    handle.write(f"{usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Row:
    target_mib: int
    db_mib: float
    parts: int
    largest_part_mib: float
    raw_mib: float
    stored_mib: float
    wall_s: float
    backup_s: float
    baseline_rss_mib: float
    peak_rss_mib: float
    restore_s: float | None = None
    restore_rss_mib: float | None = None


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[tuple[Path, LocalInstance]]:
    workdir = make_workdir()
    instance: LocalInstance | None = None
    try:
        instance = LocalInstance.create(workdir / "pg", settings={
            # Fast load: no WAL for data written by the transaction that truncated the table.
            "wal_level": "minimal", "max_wal_senders": "0", "archive_mode": "off",
            "max_wal_size": "4GB", "checkpoint_timeout": "30min",
        })
        yield workdir, instance
    finally:
        with signals_ignored():
            if instance is not None:
                with contextlib.suppress(Exception):
                    instance.stop("immediate")
            shutil.rmtree(workdir, ignore_errors=True)


def fill(instance: LocalInstance, target_mib: int, noise_fraction: float) -> float:
    """Load about target_mib MiB into database bench; return pg_database_size in MiB."""
    instance.psql(f"CREATE DATABASE {DATABASE}")
    noise_mib = target_mib * noise_fraction
    scale = max(1, round((target_mib - noise_mib) / PGBENCH_MIB_PER_SCALE))
    log(f"  pgbench -i -s {scale}")
    run(as_db_user([pg_tool("pgbench"), "-i", "-q", "-s", str(scale), "-I", "dtGvp", "-h", "127.0.0.1",
                    "-p", str(instance.port), "-U", "postgres", DATABASE]), what="pgbench -i")
    rows = int(noise_mib * MIB / NOISE_ROW_FOOTPRINT)
    if rows:
        log(f"  {rows} rows of {NOISE_ROW_BYTES} random bytes")
        md5s = " || ".join(["md5(random()::text)"] * (NOISE_ROW_BYTES // 16))
        instance.psql(
            "BEGIN; CREATE TABLE noise (id bigint PRIMARY KEY, payload bytea NOT NULL); "
            f"INSERT INTO noise SELECT g, decode({md5s}, 'hex') FROM generate_series(1, {rows}) g; COMMIT",
            dbname=DATABASE,
        )
    instance.psql("VACUUM ANALYZE", dbname=DATABASE)
    instance.psql("CHECKPOINT")
    return int(instance.psql(f"SELECT pg_database_size('{DATABASE}')")) / MIB


def enable_archiving(workdir: Path, instance: LocalInstance, part_size: str, threads: int | None,
                     sections: dict[str, Any]) -> Path:
    """Archive through pgvault wal-push into a file repository, as tests/conftest.py's new_cluster does."""
    config = workdir / "pgvault.yaml"
    repo = workdir / "repo"
    policy: dict[str, Any] = {
        "cluster": "bench",
        "postgres": {"conninfo": instance.conninfo()},
        "repository": {"url": f"file://{repo}"},
        "backup": {"part_size": part_size},
    }
    if threads is not None:
        policy["compression"] = {"threads": threads}
    for name, values in sections.items():
        policy.setdefault(name, {}).update(values)
    config.write_text(yaml.safe_dump(policy, sort_keys=False))
    chown_to_db_user(config)
    instance.stop()
    set_auto_conf(instance.pgdata, {
        "wal_level": "replica", "max_wal_senders": "10", "archive_mode": "on",
        "archive_command": f"{PGVAULT} --config {config} wal-push %p",
    })
    instance.start()
    run(as_db_user([PGVAULT, "--config", str(config), "-q", "init"]), what="pgvault init")
    return config


def measured(workdir: Path, config: Path, *args: str) -> tuple[str, float, float]:
    """Run `pgvault ARGS`; return (its stdout, wall seconds, peak RSS of the pgvault process in MiB).

    runuser forks the command and waits for it, so the measuring layer sits inside runuser, right above
    pgvault. ru_maxrss is a maximum over the process and its waited-for children, never their sum.
    """
    rss_file = workdir / "peak-rss-kib"
    command = [PGVAULT, "--config", str(config), "-q", *args]
    if os.access(GNU_TIME, os.X_OK):
        wrapped = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *command]
    else:
        wrapped = [sys.executable, "-c", WAIT4_WRAPPER, str(rss_file), *command]
    started = time.monotonic()
    result = run(as_db_user(wrapped), what=f"pgvault {' '.join(args)}")
    wall = time.monotonic() - started
    # GNU time puts "Command exited with non-zero status N" before the figure when the command fails.
    peak_kib = int(rss_file.read_text().split()[-1])
    return result.stdout, wall, peak_kib / 1024


def bench_one(target_mib: int, part_size: str, noise_fraction: float, threads: int | None, *,
              restore: bool = False, sections: dict[str, Any] | None = None) -> Row:
    log(f"size {target_mib} MiB: creating cluster")
    with throwaway_cluster() as (workdir, instance):
        instance.start()
        db_mib = fill(instance, target_mib, noise_fraction)
        log(f"  database {db_mib:.0f} MiB; enabling archiving through pgvault")
        config = enable_archiving(workdir, instance, part_size, threads, sections or {})
        # The same process without the stream: interpreter, imports, connection, repository.
        _, _, baseline = measured(workdir, config, "check")
        log("  pgvault backup")
        stdout, wall, peak = measured(workdir, config, "backup", "--json")
        record = json.loads(stdout)
        row = Row(target_mib=target_mib, db_mib=db_mib, parts=len(record["parts"]),
                  largest_part_mib=max(p["raw_size"] for p in record["parts"]) / MIB,
                  raw_mib=record["raw_size"] / MIB, stored_mib=record["stored_size"] / MIB, wall_s=wall,
                  backup_s=float(record["duration_s"]), baseline_rss_mib=baseline, peak_rss_mib=peak)
        log(f"  {row.parts} parts, {row.raw_mib:.0f} MiB raw, {row.stored_mib:.0f} MiB stored, "
            f"{row.wall_s:.1f} s, peak RSS {row.peak_rss_mib:.1f} MiB (pgvault check: {row.baseline_rss_mib:.1f})")
        if restore:
            target = workdir / "restored"
            log("  pgvault restore")
            _, row.restore_s, row.restore_rss_mib = measured(
                workdir, config, "restore", "--pgdata", str(target), "--backup", record["id"],
                "--target", "immediate", "--archive-mode", "off")
            log(f"  restored in {row.restore_s:.1f} s, peak RSS {row.restore_rss_mib:.1f} MiB")
        return row


def print_table(rows: list[Row], part_size: str, threads: int | None,
                sections: dict[str, dict[str, Any]] | None = None) -> None:
    zstd = "zstd threads: one per core" if threads in (None, 0) else f"zstd threads: {threads}"
    settings = "".join(f", {name}.{key}: {value}" for name, values in (sections or {}).items()
                       for key, value in values.items())
    print(f"part size {part_size}, {zstd}{settings}, {os.cpu_count()} CPUs; check RSS = peak RSS of `pgvault check` "
          "on the same cluster")
    header: tuple[str, ...] = ("size MiB", "DB MiB", "parts", "largest part MiB", "raw MiB", "stored MiB",
                               "wall s", "peak RSS MiB", "check RSS MiB")
    cells = [[f"{r.target_mib}", f"{r.db_mib:.0f}", f"{r.parts}", f"{r.largest_part_mib:.0f}", f"{r.raw_mib:.0f}",
              f"{r.stored_mib:.0f}", f"{r.wall_s:.1f}", f"{r.peak_rss_mib:.1f}", f"{r.baseline_rss_mib:.1f}"]
             for r in rows]
    if any(r.restore_s is not None for r in rows):
        header += ("restore s", "restore RSS MiB")
        for r, c in zip(rows, cells, strict=True):
            c += [f"{r.restore_s:.1f}" if r.restore_s is not None else "",
                  f"{r.restore_rss_mib:.1f}" if r.restore_rss_mib is not None else ""]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256,1024",
                        help="database sizes to back up, MiB, comma-separated (default 64,256,1024)")
    parser.add_argument("--part-size", default="32MiB", help="backup.part_size of the policy (default 32MiB)")
    parser.add_argument("--noise-fraction", type=float, default=0.25,
                        help="share of the data that is random bytes rather than pgbench tables (default 0.25)")
    parser.add_argument("--threads", type=int, default=None,
                        help="compression.threads (default: the policy default, one zstd worker per core)")
    parser.add_argument("--restore", action="store_true",
                        help="also restore each backup into an empty directory and measure that")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another policy setting, e.g. backup.upload_parallel=4 or restore.parallel=1 "
                        "(repeatable; the value is read as YAML)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        parse_size(args.part_size)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes needs positive MiB values")
    if not 0 <= args.noise_fraction < 1:
        parser.error("--noise-fraction must be in [0, 1)")
    if args.threads is not None and not 0 <= args.threads <= 64:
        parser.error("--threads must be 0-64, as compression.threads")
    sections: dict[str, dict[str, Any]] = {}
    for setting in args.settings:
        name, sep, value = setting.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not section or not key:
            parser.error(f"--set {setting!r}: write SECTION.KEY=VALUE, e.g. restore.parallel=4")
        sections.setdefault(section, {})[key] = yaml.safe_load(value)
    args.sections = sections
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupted)
    part_mib = parse_size(args.part_size) / MIB
    if max(args.sizes) < 8 * part_mib:
        log(f"note: the largest size is less than 8x the part size ({part_mib:.0f} MiB)")
    rows: list[Row] = []
    try:
        for size in args.sizes:
            rows.append(bench_one(size, args.part_size, args.noise_fraction, args.threads, restore=args.restore,
                                  sections=args.sections))
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; cleaned up")
        return 130
    except (PgvaultError, RuntimeError) as exc:
        log(f"failed: {exc}")
        return 1
    print_table(rows, args.part_size, args.threads, args.sections)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
