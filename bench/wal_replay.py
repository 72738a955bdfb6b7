"""WAL replay through `pgvault wal-fetch`, with and without prefetch, from a file and an S3 repository.

The issue's target: "WAL replay with prefetch >= 3x faster than without on S3 (moto_server)". For each
backend this script

  1. initdb's a throwaway cluster in a /tmp dir owned by the postgres OS user (as tests/conftest.py does)
     archiving through `pgvault wal-push` into a fresh repository: a directory, or a bucket on a
     moto_server started on 127.0.0.1 for the run,
  2. takes a backup, then writes --wal-mb MiB of WAL (INSERTs of rows that compress about 2:1 under
     zstd, as text and numbers do) and waits until the last segment is archived (`pgvault check`),
  3. restores that backup --runs times with restore.prefetch 0 and --runs times with restore.prefetch
     --prefetch (alternating), each into a fresh directory (archive_mode off), starts it and times
     recovery: from `pg_ctl start` until pg_is_in_recovery() is false, i.e. every archived segment
     fetched by restore_command and replayed, and the copy promoted,
  4. counts restore_command calls and, with prefetch, how many the spool served (the report
     recovery_end_command writes to the server log),
  5. prints one line per run and the ratio of the medians per backend, and destroys everything (also
     on Ctrl-C or SIGTERM).

The restore itself (`pgvault restore`) is not timed: it is the same with and without prefetch.

Usage:
    .venv/bin/python bench/wal_replay.py [--backends file,s3] [--wal-mb 256] [--prefetch 8]
        [--prefetch-parallel 4] [--runs 1] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from benchlib import PGVAULT, Interrupted, log, make_workdir, moto_server, raise_interrupted, signals_ignored

from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user

MIB = 1024 * 1024
SEGMENT = 16 * MIB
CLUSTER = "bench"
REGION = "us-east-1"
# moto accepts any credentials; these exist so boto3 finds some (PostgreSQL's children inherit them).
S3_ENV = {"AWS_ACCESS_KEY_ID": "pgvault-bench-key", "AWS_SECRET_ACCESS_KEY": "pgvault-bench-secret",
          "AWS_DEFAULT_REGION": REGION}
REPORT = re.compile(r"(\d+) segments prefetched, (\d+) served from the spool")
RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
RESTORED_AT = re.compile(r'^(\S+ \S+) \S+ \[\d+\] LOG:  restored log file "[0-9A-F]{24}" from archive', re.M)
READY = "database system is ready to accept connections"
REDO_DONE = re.compile(r"redo done at \S+ system usage: .*elapsed: ([\d.]+) s")


@dataclass
class Run:
    backend: str
    prefetch: int
    segments: int  # WAL segments restored by restore_command
    recovery_s: float  # pg_ctl start until promoted
    redo_s: float | None  # PostgreSQL's own "redo done ... elapsed": from the first record replayed to the end of WAL
    per_segment_s: float | None  # median time from one segment delivered to the next (the steady rate)
    served: int | None  # segments the spool handed over (None: prefetch off)
    prefetched: int | None


def pgvault(config: Path, *args: str, timeout: float = 1800) -> str:
    proc = subprocess.run(as_db_user([PGVAULT, "--config", str(config), *args]), capture_output=True, text=True,
                          cwd="/tmp", timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pgvault {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def repository_section(backend: str, workdir: Path, endpoint: str | None) -> dict[str, Any]:
    if backend == "file":
        return {"url": f"file://{workdir / 'repo'}"}
    import boto3

    bucket = f"pgvault-bench-{os.getpid()}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    return {"url": f"s3://{bucket}/repo", "s3": {"endpoint_url": endpoint}}


def write_policy(path: Path, conninfo: str, repository: dict[str, Any], restore: dict[str, Any]) -> Path:
    policy = {"cluster": CLUSTER, "postgres": {"conninfo": conninfo}, "repository": repository,
              "backup": {"part_size": "64MiB"}, "restore": restore}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    chown_to_db_user(path)
    return path


def write_wal(instance: LocalInstance, wal_mib: int) -> int:
    """INSERT rows until wal_mib MiB of WAL were written; return the segments it spans."""
    start = instance.psql("SELECT pg_current_wal_lsn()")
    instance.psql("CREATE TABLE replay (id bigint, n int, note text)")
    written = 0
    batch = 0
    while written < wal_mib * MIB:
        batch += 1
        # ~150 bytes of row per INSERTed row: hex digests, numbers, and repeated words.
        instance.psql("INSERT INTO replay SELECT g, g % 1000, md5(g::text) || ' order ' || (g % 97) || "
                      f"' shipped ' || md5((g * {batch})::text) FROM generate_series(1, 100000) g")
        written = int(instance.psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')"))
    instance.psql("SELECT pg_switch_wal()")
    return written // SEGMENT + 1


def time_recovery(instance: LocalInstance, timeout: float = 3600) -> float:
    """Start a restored copy and return the seconds until it left recovery (promoted).

    The end is the server's own "ready to accept connections" line (logged once the end-of-recovery
    checkpoint is done), read from its log every 20 ms: polling with psql would start a process
    20 times a second and take CPU from the recovery being measured.
    """
    instance.log_path.unlink(missing_ok=True)
    started = time.monotonic()
    instance.start(wait=False)
    deadline = started + timeout
    checked = started
    while True:
        with contextlib.suppress(FileNotFoundError):
            if READY in instance.log_path.read_text(errors="replace"):
                return time.monotonic() - started
        now = time.monotonic()
        if now - checked > 2:
            checked = now
            if not instance.is_running():
                raise RuntimeError(f"the restored copy stopped before promotion:\n{instance.log_tail(30)}")
        if now > deadline:
            raise RuntimeError(f"the restored copy did not promote in {timeout:.0f} s")
        time.sleep(0.02)


def steady_rate(server_log: str) -> float | None:
    """The median time from one segment restore_command delivered to the next (fetch and replay): the
    rate without the calls every recovery makes once (history files, the end of the archive, the
    last segment read again, recovery_end_command)."""
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
              for m in RESTORED_AT.finditer(server_log)]
    if len(stamps) < 3:
        return None
    return statistics.median((b - a).total_seconds() for a, b in pairwise(stamps))


def replay_once(workdir: Path, config: Path, backend: str, prefetch: int, label: str,
                logs: Path | None) -> Run:
    pgdata = workdir / f"restored-{label}"
    pgvault(config, "-q", "restore", "--pgdata", str(pgdata), "--archive-mode", "off")
    instance = LocalInstance.existing(pgdata)
    try:
        seconds = time_recovery(instance)
    finally:
        with contextlib.suppress(Exception):
            instance.stop("immediate")
    server_log = instance.log_path.read_text(errors="replace")
    if logs is not None:
        (logs / f"{backend}-{label}.log").write_text(server_log)
    segments = len(set(RESTORED.findall(server_log)))
    report = REPORT.search(server_log)
    redo = REDO_DONE.search(server_log)
    run = Run(backend, prefetch, segments, seconds, float(redo.group(1)) if redo else None, steady_rate(server_log),
              int(report.group(2)) if report else None, int(report.group(1)) if report else None)
    shutil.rmtree(pgdata, ignore_errors=True)
    return run


def bench_backend(backend: str, args: argparse.Namespace) -> list[Run]:
    workdir = make_workdir()
    instance: LocalInstance | None = None
    runs: list[Run] = []
    saved_env = dict(os.environ)
    try:
        os.environ.update(S3_ENV)
        os.environ["PGVAULT_SPOOL_DIR"] = str(workdir / "spool")
        # Installed from a wheel, pgvault comes with compiled bytecode. A source checkout gives the
        # postgres user none (it cannot write __pycache__ there, and PYTHONDONTWRITEBYTECODE may be
        # set), so every restore_command call would compile pgvault afresh: give it a cache it can write.
        pycache = workdir / "pycache"
        pycache.mkdir()
        chown_to_db_user(pycache)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(pycache)
        with moto_server() if backend == "s3" else contextlib.nullcontext() as endpoint:
            repository = repository_section(backend, workdir, endpoint)
            instance = LocalInstance.create(workdir / "pg")
            policy = {"prefetch": args.prefetch, "prefetch_parallel": args.prefetch_parallel}
            on = write_policy(workdir / "prefetch-on.yaml", instance.conninfo(), repository, policy)
            off = write_policy(workdir / "prefetch-off.yaml", instance.conninfo(), repository, {"prefetch": 0})
            set_auto_conf(instance.pgdata, {
                "wal_level": "replica", "archive_mode": "on", "autovacuum": "off", "max_wal_size": "4GB",
                "archive_command": f"{PGVAULT} --config {on} wal-push %p",
            })
            instance.start()
            pgvault(on, "-q", "init")
            log(f"{backend}: backup")
            pgvault(on, "-q", "backup")
            log(f"{backend}: writing {args.wal_mb} MiB of WAL")
            segments = write_wal(instance, args.wal_mb)
            log(f"{backend}: {segments} segments written; waiting until they are archived")
            pgvault(on, "-q", "check", timeout=3600)
            instance.stop()
            for i in range(args.runs):
                for prefetch, config in ((0, off), (args.prefetch, on)):
                    run = replay_once(workdir, config, backend, prefetch, f"{i}-{prefetch}", args.keep_logs)
                    served = "" if run.served is None else f", {run.served} of {run.prefetched} prefetched served"
                    rate = f" (median {run.per_segment_s:.3f} s per segment)" if run.per_segment_s else ""
                    log(f"{backend}: prefetch {prefetch}: {run.segments} segments, recovery {run.recovery_s:.1f} s"
                        f"{rate}{served}")
                    runs.append(run)
        return runs
    finally:
        with signals_ignored():
            if instance is not None:
                with contextlib.suppress(Exception):
                    instance.stop("immediate")
            os.environ.clear()
            os.environ.update(saved_env)
            shutil.rmtree(workdir, ignore_errors=True)


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"WAL replay through pgvault wal-fetch: {args.wal_mb} MiB of WAL, prefetch {args.prefetch} "
          f"({args.prefetch_parallel} at once); medians of {args.runs} run(s), prefetch off -> on")
    print("  recovery: pg_ctl start until promoted (every restore_command call, the end-of-recovery checkpoint)")
    print("  redo: PostgreSQL's 'redo done ... elapsed' (first record replayed to the end of the archive)")
    print("  s/seg: median time from one segment delivered to the next")
    print(f"{'backend':<8} {'segments':>8}  {'recovery (s)':>17}  {'redo (s)':>17}  {'s/seg':>19}  {'served':>7}")
    for backend in dict.fromkeys(r.backend for r in runs):
        off = [r for r in runs if r.backend == backend and r.prefetch == 0]
        on = [r for r in runs if r.backend == backend and r.prefetch > 0]
        cells = []
        for value, digits in ((lambda r: r.recovery_s, 1), (lambda r: r.redo_s, 1), (lambda r: r.per_segment_s, 3)):
            before = statistics.median(value(r) or 0.0 for r in off)
            after = statistics.median(value(r) or 0.0 for r in on)
            ratio = f"{before / after:.1f}x" if after else "-"
            cells.append(f"{before:.{digits}f} -> {after:.{digits}f} {ratio:>5}")
        served = f"{on[-1].served}/{on[-1].segments}" if on[-1].served is not None else "-"
        print(f"{backend:<8} {max(r.segments for r in off):>8}  {cells[0]:>17}  {cells[1]:>17}  {cells[2]:>19}  "
              f"{served:>7}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="file,s3", help="Comma-separated: file, s3 (default: both).")
    parser.add_argument("--wal-mb", type=int, default=256, help="MiB of WAL to replay (default 256).")
    parser.add_argument("--prefetch", type=int, default=8, help="restore.prefetch when on (default 8).")
    parser.add_argument("--prefetch-parallel", type=int, default=4, help="restore.prefetch_parallel (default 4).")
    parser.add_argument("--runs", type=int, default=1, help="Replays per setting (default 1); medians are shown.")
    parser.add_argument("--json-out", metavar="FILE", help="Also write every run as JSON to FILE.")
    parser.add_argument("--keep-logs", metavar="DIR", type=Path,
                        help="Copy each restored copy's server log (restore_command's timeline) into DIR.")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - {"file", "s3"}:
        parser.error("--backends takes file, s3 or both")
    if args.wal_mb < 1 or args.prefetch < 1 or args.runs < 1:
        parser.error("--wal-mb, --prefetch and --runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupted)
    runs: list[Run] = []
    try:
        for backend in args.backends:
            runs.extend(bench_backend(backend, args))
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; cleaned up")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    print_table(runs, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
