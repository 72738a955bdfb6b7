"""Latency of `pgvault wal-push` as PostgreSQL's archiver runs it: fast path, full path, and without look-ahead.

The issue's target: a fast-path wal-push (a segment an earlier call's look-ahead already pushed) takes
at most 50 ms median. For each backend (a directory, and S3 on a local moto_server) this script

  1. initdb's a throwaway PostgreSQL 15 (16 MiB segments) in a /tmp dir owned by the postgres OS user,
     and a fresh repository, `pgvault init`;
  2. per variant (archive.look_ahead: 0, then the default), with archive_command = 'false', writes
     --segments segments of WAL (rows of md5 text: about as compressible as real WAL), so they queue
     up as `.ready`;
  3. sets archive_command to a timing shim and lets PostgreSQL drain the queue. The shim notes whether
     a marker for the segment was in the push spool before the call (the fast path can answer only
     then; nothing here tampers with markers, so such a call is a fast-path call) and the wall time of
     the pgvault process between two `date +%s%N`, fork and exec of the console script included;
  4. prints per variant and kind: calls, median, p90, p99 (the maximum when there are fewer than 100
     calls), and the drain's seconds per segment (what the archiver's throughput is);
  5. breaks the fast path's time down: interpreter start (`python -c pass` with the venv's site), the
     imports of entry + push_ahead (-X importtime), and SHA-256 of one 16 MiB segment in-process (what
     the fast path spends only when the file's identity differs from the marker's).

Everything runs as the postgres OS user, with the data directory as working directory, exactly as
archive_command does. The cluster, repositories and moto_server are removed at the end (--keep keeps
the work directory).

Usage:
    .venv/bin/python bench/wal_push_latency.py [--segments 40] [--backends file,s3] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from benchlib import PGVAULT, VENV_BIN, log, moto_server

from pgvault.pg.autoconf import set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user
from pgvault.spool import push_spool

# Throwaway credentials of the local moto_server; they protect nothing.
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
SEGMENT = 16 * 1024 * 1024
# Everything a wal-push imports on either path, compiled once before measuring.
WARM_IMPORTS = ("import re, pgvault.entry, pgvault.push_ahead, pgvault.cli, pgvault.archive, pgvault.catalog, "
                "pgvault.config, pgvault.repo.file, pgvault.repo.s3, boto3, botocore.session, zstandard, yaml, "
                "concurrent.futures")

# archive_command shim (run with -I -S: no site, a few ms): argv = %p %f. One line per call: name, kind,
# exit status, wall and CPU microseconds of the pgvault process (posix_spawn to wait4, fork/exec included),
# its peak RSS in KiB.
SHIM = """
import os, sys, time
path, name = sys.argv[1], sys.argv[2]
kind = "fast" if os.path.exists(os.path.join({spool!r}, name)) else "full"
env = dict(os.environ, PGVAULT_SPOOL_DIR={spool_root!r}, **{extra_env!r})
argv = [{pgvault!r}, "--config", {config!r}, "wal-push", path]
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, env)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
with open({log!r}, "a") as out:
    out.write(f"{{name}} {{kind}} {{code}} {{int(wall * 1e6)}} {{int((usage.ru_utime + usage.ru_stime) * 1e6)}} "
              f"{{usage.ru_maxrss}}\\n")
sys.exit(code)
"""


@dataclass(frozen=True)
class Call:
    name: str
    kind: str  # "fast": a marker was in the spool before the call; "full": none was
    rc: int
    wall_us: int
    cpu_us: int
    rss_kib: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(kind: str, calls: list[Call]) -> str:
    if not calls:
        return f"  {kind:<27} calls    0"
    wall = [c.wall_us / 1000 for c in calls]
    cpu = [c.cpu_us / 1000 for c in calls]
    tail = "max" if len(wall) < 100 else "p99"
    return (f"  {kind:<27} calls {len(wall):4d}  wall median {statistics.median(wall):7.1f} ms"
            f"  p90 {percentile(wall, 0.9):7.1f}  {tail} {percentile(wall, 0.99):7.1f}"
            f"  | CPU median {statistics.median(cpu):6.1f} ms"
            f"  peak RSS {max(c.rss_kib for c in calls) / 1024:4.0f} MiB")


class Bench:
    def __init__(self, workdir: Path, backend: str, endpoint: str | None, segments: int) -> None:
        self.workdir = workdir / backend
        self.workdir.mkdir()
        chown_to_db_user(self.workdir)
        self.backend = backend
        self.endpoint = endpoint
        self.segments = segments
        self.spool_root = self.workdir / "spool"
        self.config = self.workdir / "policy.yaml"
        self.pg = LocalInstance.create(self.workdir / "pg")
        set_auto_conf(self.pg.pgdata, {"wal_level": "replica", "archive_mode": "on", "archive_command": "false",
                                       "max_wal_size": "8GB", "checkpoint_timeout": "1h", "autovacuum": "off",
                                       "synchronous_commit": "off"})
        self.pg.start()
        self.pg.psql("CREATE TABLE filler (v text)")
        self.repository: dict[str, object]
        if backend == "s3":
            import boto3

            bucket = f"bench-{os.getpid()}"
            boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items()
                                                          if k != "AWS_DEFAULT_REGION"},
                         region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
            self.repository = {"url": f"s3://{bucket}/repo", "s3": {"endpoint_url": endpoint}}
        else:
            self.repository = {"url": f"file://{self.workdir / 'repo'}"}
        self.write_policy(look_ahead=None)
        self.pgvault("init")

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PGVAULT_SPOOL_DIR": str(self.spool_root)}
        if self.backend == "s3":
            env.update(S3_ENV)
        return env

    def pgvault(self, *args: str) -> str:
        done = subprocess.run(as_db_user([PGVAULT, "--config", str(self.config), *args]), capture_output=True,
                              text=True, cwd="/tmp", env=self.env(), check=False)
        if done.returncode:
            raise RuntimeError(f"pgvault {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def write_policy(self, look_ahead: int | None) -> None:
        policy: dict[str, object] = {"cluster": "bench", "postgres": {"conninfo": self.pg.conninfo()},
                                     "repository": self.repository}
        if look_ahead is not None:
            policy["archive"] = {"look_ahead": look_ahead}
        self.config.write_text(yaml.safe_dump(policy, sort_keys=False))
        chown_to_db_user(self.config)

    def set_archive_command(self, command: str) -> None:
        quoted = command.replace("'", "''")
        self.pg.psql(f"ALTER SYSTEM SET archive_command = '{quoted}'")
        self.pg.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while self.pg.psql("SHOW archive_command") != command:
            if time.monotonic() > deadline:
                raise RuntimeError("archive_command was not reloaded")
            time.sleep(0.05)

    def ready(self) -> list[str]:
        status = self.pg.pgdata / "pg_wal" / "archive_status"
        return sorted(p.name.removesuffix(".ready") for p in status.iterdir() if p.name.endswith(".ready"))

    def queue(self) -> None:
        """With archiving off: fill self.segments segments with WAL and let them queue as .ready."""
        self.set_archive_command("false")
        rows = SEGMENT // 110  # rows of 64 hex characters, about 110 bytes of WAL each
        start = len(self.ready())
        while len(self.ready()) < start + self.segments:
            self.pg.psql(f"INSERT INTO filler SELECT md5(random()::text) || md5(random()::text) "
                         f"FROM generate_series(1, {rows})")
        self.pg.psql("TRUNCATE filler")

    def drain(self, variant: str, look_ahead: int | None) -> tuple[list[Call], float]:
        self.write_policy(look_ahead)
        self.queue()
        queued = len(self.ready())
        shim_log = self.workdir / f"calls-{variant}.log"
        shim = self.workdir / f"shim-{variant}.py"
        shim.write_text(SHIM.format(spool=str(self.config_for_spool()), spool_root=str(self.spool_root),
                                    extra_env=S3_ENV if self.backend == "s3" else {}, pgvault=PGVAULT,
                                    config=str(self.config), log=str(shim_log)))
        chown_to_db_user(shim)
        log(f"{self.backend} {variant}: draining {queued} queued segments")
        started = time.monotonic()
        self.set_archive_command(f"{VENV_BIN / 'python'} -I -S {shim} %p %f")
        while self.ready():
            time.sleep(0.05)
            if time.monotonic() - started > 1800:
                raise RuntimeError("archiving did not drain in 30 minutes")
        elapsed = time.monotonic() - started
        self.set_archive_command("false")
        calls = []
        for line in shim_log.read_text().splitlines():
            name, kind, rc, wall, cpu, rss = line.split()
            calls.append(Call(name, kind, int(rc), int(wall), int(cpu), int(rss)))
        return calls, elapsed / max(1, queued)

    def config_for_spool(self) -> Path:
        old = os.environ.get("PGVAULT_SPOOL_DIR")
        os.environ["PGVAULT_SPOOL_DIR"] = str(self.spool_root)
        try:
            return push_spool(self.config)
        finally:
            if old is None:
                del os.environ["PGVAULT_SPOOL_DIR"]
            else:
                os.environ["PGVAULT_SPOOL_DIR"] = old

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.stop(mode="immediate")


def breakdown() -> list[str]:
    """Where a fast-path call's time goes, measured as the postgres user does it."""
    python = str(VENV_BIN / "python")

    def best_of(cmd: list[str], n: int = 15) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(as_db_user(cmd), capture_output=True, cwd="/tmp", check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    runuser = best_of(["/bin/true"])
    bare = best_of([python, "-c", "pass"])
    entry = best_of([python, "-c", "import pgvault.entry, pgvault.push_ahead"])
    trace = subprocess.run(as_db_user([python, "-X", "importtime", "-c", "import pgvault.entry, pgvault.push_ahead"]),
                           capture_output=True, text=True, cwd="/tmp", check=True).stderr
    top = sorted((int(line.split("|")[1]), line.split("|")[2].strip()) for line in trace.splitlines()
                 if line.startswith("import time:") and line.split("|")[1].strip().isdigit() and
                 not line.split("|")[2].startswith("  "))[-6:]
    data = os.urandom(SEGMENT)
    t0 = time.perf_counter()
    for _ in range(10):
        hashlib.sha256(data).hexdigest()
    sha = (time.perf_counter() - t0) / 10 * 1000
    lines = [f"  runuser + /bin/true (not part of PostgreSQL's call)  {runuser:6.1f} ms",
             f"  python -c pass (venv site)                          {bare - runuser:6.1f} ms",
             f"  + import pgvault.entry, pgvault.push_ahead          {entry - bare:6.1f} ms",
             f"  SHA-256 of 16 MiB in-process (only when the file's identity changed) {sha:6.1f} ms",
             "  largest top-level imports (-X importtime, cumulative us): "
             + ", ".join(f"{name} {us}" for us, name in reversed(top))]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", type=int, default=40, help="segments queued per variant (16 MiB each)")
    parser.add_argument("--backends", default="file,s3")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="run pgvault without cached bytecode (PYTHONDONTWRITEBYTECODE=1 as set, e.g., here)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pgvault-bench-push-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    chown_to_db_user(workdir)
    report: list[str] = []
    if args.no_bytecode:
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        report.append("bytecode: none (every module compiled from source on each call)")
    else:
        # As pip installs it: every module's bytecode compiled once. Kept in a cache of its own, so this
        # run writes nothing into the checkout (PostgreSQL, pg_ctl and the shim all inherit this).
        pycache = workdir / "pycache"
        pycache.mkdir()
        chown_to_db_user(pycache)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(pycache)
        subprocess.run(as_db_user([str(VENV_BIN / "python"), "-c", WARM_IMPORTS]), cwd="/tmp", check=True)
        report.append("bytecode: cached (as after pip install)")
    try:
        with contextlib.ExitStack() as stack:
            for backend in args.backends.split(","):
                endpoint = stack.enter_context(moto_server()) if backend == "s3" else None
                bench = Bench(workdir, backend, endpoint, args.segments)
                stack.callback(bench.close)
                report.append(f"{backend}:")
                for variant, look_ahead in (("look_ahead=0", 0), ("look_ahead=default", None)):
                    calls, per_segment = bench.drain(variant.replace("=", "-"), look_ahead)
                    failed = [c for c in calls if c.rc != 0]
                    report.append(f" {variant}: {per_segment * 1000:.0f} ms of drain per segment (shim included)"
                                  + (f", {len(failed)} failed calls" if failed else ""))
                    for kind in ("full", "fast"):
                        chosen = [c for c in calls if c.kind == kind and c.rc == 0]
                        if chosen or kind == "full":
                            label = "full path" if kind == "full" else "fast path (marker present)"
                            report.append(summary(label, chosen))
                bench.close()
        report.append("fast path, where the time goes:")
        report.extend(breakdown())
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
