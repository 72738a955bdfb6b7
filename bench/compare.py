"""pgvault side by side with pgBackRest, on the same cluster, in one run.

The issue's speed targets are measured here, not by timed tests: backup and restore wall time
≤ 1.0× pgBackRest (process-max = cores, compress-type=zst at pgvault's level), sustained archiving
≥ pgBackRest archive-async, fast-path wal-push median ≤ 50 ms, WAL replay with prefetch ≥ 3× faster
than without on S3, peak RSS < 300 MB.

One throwaway cluster (pgvault.pg.instance.LocalInstance, as bench/backup_memory.py) is filled with
pgbench tables plus a table of less compressible rows; then, for each backend (file, then S3 on a
local moto_server over TLS), both tools get fresh repositories and, one after the other in a fixed
order (pgvault first), on the same data:

  backup   full backup: wall time, repository bytes (WAL archive excluded), peak RSS of the process tree
  restore  restore of that backup + start of the copy until recovery reached consistency and promoted
  archive  archive_command under `pgbench` writing as fast as it can for --pgbench-seconds: segments
           archived per second, .ready files left at the end and seconds until drained, per-call
           latency (median, p99) from a timing shim; pgvault sync (archive.look_ahead: 0), pgvault
           look-ahead (default), pgvault background (archive.background: true), pgBackRest sync,
           pgBackRest archive-async=y
  replay   PITR replay of --wal-gb of WAL from the repository: pgvault with restore.prefetch: 0 and
           with the default prefetch, pgBackRest archive-get sync and async (reference)

Settings a pgvault under development may not know yet (archive.look_ahead, archive.background,
restore.prefetch) are
probed first; a variant whose setting this pgvault rejects is skipped with a note.

Usage:
    .venv/bin/python bench/compare.py                                      # 2 GB, 60 s, 1 GB WAL, file+s3
    .venv/bin/python bench/compare.py --size-gb 0.2 --pgbench-seconds 10 --wal-gb 0.1    # smoke run
    .venv/bin/python bench/compare.py --only backup,restore --backends file --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import PGVAULT, Interrupted, log, make_workdir, run
from compare_tools import (
    ARCHIVE_LEVEL,
    BACKUP_LEVEL,
    PgBackRest,
    Pgvault,
    S3Endpoint,
    db_user_dir,
    pgbackrest_binary,
    policy_accepts,
)

from pgvault.errors import PgvaultError
from pgvault.pg.autoconf import read_auto_conf, set_auto_conf
from pgvault.pg.instance import LocalInstance, as_db_user, chown_to_db_user, pg_tool

MIB = 1024 * 1024
SEGMENT = 16 * MIB
DATABASE = "bench"
PHASES = ("backup", "restore", "archive", "replay")
BACKENDS = ("file", "s3")
PGBENCH_SHARE = 0.7  # of the requested size; the rest is the `events` table
PGBENCH_MIB_PER_SCALE = 15
EVENT_ROW_FOOTPRINT = 275  # on-disk bytes per events row: tuple, line pointer, primary key entry
RECOVERY_TIMEOUT = 3 * 3600
RSS_TARGET = "pgvault < 300 MB (286 MiB)"
# The workload writes as fast as the CPUs allow, not as fast as this disk fsyncs commits.
PGBENCH_OPTIONS = "-c synchronous_commit=off"
# Mixed with pgbench's tpcb-like transactions in the default workload: 100 rows of 128 hex characters
# (~20 KiB of WAL per transaction), so WAL comes faster than a 2-core machine makes it with tpcb-like alone.
FILLER_SCRIPT = """\
INSERT INTO wal_filler (note) SELECT md5(random()::text) || md5(random()::text) || md5(random()::text)
  || md5(random()::text) FROM generate_series(1, 100);
"""
TIMING_SHIM = """\
#!/bin/bash
# timed.sh LOG COMMAND...: run COMMAND, append "start end status last-argument" to LOG.
# bash's own clock ($EPOCHREALTIME): no process is started to read the time.
log=$1; shift
start=$EPOCHREALTIME
"$@"
status=$?
echo "$start $EPOCHREALTIME $status ${!#}" >> "$log"
exit $status
"""


@dataclass
class Figure:
    """One line of the table: a quantity for both tools, their ratio, and the target if there is one."""

    backend: str
    label: str
    unit: str
    pgvault: float | None
    pgbackrest: float | None
    variants: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    comparable: bool = True  # False where pgvault / pgBackRest means nothing (two different speed-ups)

    @property
    def ratio(self) -> float | None:
        if not self.comparable or self.pgvault is None or not self.pgbackrest:
            return None
        return self.pgvault / self.pgbackrest


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        log(f"note: {text}")
        self.notes.append(text)


class Resources:
    """What the run started; closed in reverse order, also on Ctrl-C or SIGTERM."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._closers: list[Callable[[], None]] = []

    def add(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for closer in reversed(self._closers):
                with contextlib.suppress(Exception):
                    closer()
            kill_strays(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def kill_strays(workdir: Path) -> None:
    """Processes this run left behind (pgBackRest's detached archive-async workers): every process whose
    command line names the work directory, by pid."""
    marker = (str(workdir) + "/").encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


# ---- the cluster -----------------------------------------------------------------------------------

class Cluster:
    """The source cluster both tools back up, and the helpers that steer and watch its archiver."""

    def __init__(self, workdir: Path, resources: Resources) -> None:
        self.workdir = workdir
        self.instance = LocalInstance.create(workdir / "pg", settings={
            # Fast load: no WAL for data written by the transaction that created the table.
            "wal_level": "minimal", "max_wal_senders": "0", "archive_mode": "off",
            "max_wal_size": "4GB", "checkpoint_timeout": "30min",
        })
        resources.add(lambda: self.instance.stop("immediate"))
        self.instance.start()

    def fill(self, size_gb: float) -> dict[str, float]:
        """About size_gb of data in database bench: pgbench tables (very compressible) and `events` rows with
        a hex text column (about half compressible) and 128 random bytes (incompressible)."""
        target_mib = size_gb * 1024
        instance = self.instance
        instance.psql(f"CREATE DATABASE {DATABASE}")
        scale = max(1, round(target_mib * PGBENCH_SHARE / PGBENCH_MIB_PER_SCALE))
        log(f"load: pgbench -i -s {scale}")
        run(as_db_user([pg_tool("pgbench"), "-i", "-q", "-s", str(scale), "-I", "dtGvp", "-h", "127.0.0.1",
                        "-p", str(instance.port), "-U", "postgres", DATABASE]), what="pgbench -i", timeout=7200)
        rows = int(target_mib * (1 - PGBENCH_SHARE) * MIB / EVENT_ROW_FOOTPRINT)
        log(f"load: {rows} rows into events")
        random_bytes = " || ".join(["md5(random()::text)"] * 8)
        instance.psql(
            "BEGIN; CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, "
            "note text NOT NULL, payload bytea NOT NULL); "
            "INSERT INTO events SELECT g, timestamptz '2026-01-01' + g * interval '1 second', "
            "(ARRAY['login', 'view', 'order', 'refund'])[1 + g % 4], md5(g::text) || md5(random()::text), "
            f"decode({random_bytes}, 'hex') FROM generate_series(1, {rows}) g; COMMIT",
            dbname=DATABASE,
        )
        instance.psql("CREATE TABLE wal_filler (id bigserial PRIMARY KEY, note text NOT NULL)", dbname=DATABASE)
        instance.psql("VACUUM ANALYZE", dbname=DATABASE)
        instance.psql("CHECKPOINT")
        return {"scale": scale, "events_rows": rows,
                "database_mib": int(instance.psql(f"SELECT pg_database_size('{DATABASE}')")) / MIB}

    def enable_archiving(self) -> None:
        """Archiving on, with no command yet: each phase sets its own (WAL waits in .ready meanwhile)."""
        self.instance.stop()
        set_auto_conf(self.instance.pgdata, {"wal_level": "replica", "max_wal_senders": "10",
                                             "archive_mode": "on", "archive_command": ""})
        self.instance.start()

    def lsn(self) -> int:
        text = self.instance.psql("SELECT pg_current_wal_lsn()")
        high, low = text.split("/")
        return (int(high, 16) << 32) + int(low, 16)

    def archiver(self) -> dict[str, Any]:
        row = self.instance.query("SELECT archived_count, failed_count, last_archived_wal, last_failed_wal "
                                  "FROM pg_stat_archiver")[0]
        return {"archived": row[0], "failed": row[1], "last_archived": row[2], "last_failed": row[3]}

    def ready(self) -> int:
        return int(self.instance.psql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"))

    def set_archive_command(self, command: str) -> None:
        set_auto_conf(self.instance.pgdata, {"archive_command": command})
        self.instance.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while self.instance.psql("SHOW archive_command") != command:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not take the new archive_command")
            time.sleep(0.1)
        time.sleep(0.5)  # the archiver reloads its configuration between two files, not at once

    def switch_and_drain(self, timeout: float = 600) -> float:
        self.instance.psql("SELECT pg_switch_wal()")
        return self.drain(timeout)

    def drain(self, timeout: float = 600) -> float:
        """Wait until no segment waits to be archived; the seconds that took."""
        started = time.monotonic()
        failed = self.archiver()["failed"]
        while self.ready():
            now = self.archiver()
            if now["failed"] > failed + 20 or time.monotonic() - started > timeout:
                raise RuntimeError(f"archiving does not drain ({self.ready()} .ready, {now['failed']} failures, "
                                   f"last failed {now['last_failed']});\n{self.instance.log_tail(30)}")
            time.sleep(0.2)
        return time.monotonic() - started

    def warm_cache(self) -> None:
        """Read the data directory once, so each backup starts from the same (warm) page cache."""
        for dirpath, _dirs, files in os.walk(self.instance.pgdata):
            for name in files:
                with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as handle:
                    while handle.read(MIB):
                        pass

    def reset_filler(self) -> None:
        """Empty the table the filler transactions grow (so the database does not grow run after run)."""
        self.instance.psql("TRUNCATE wal_filler", dbname=DATABASE)

    def pgbench(self, seconds: float, clients: int, workload: str) -> dict[str, float]:
        threads = min(clients, os.cpu_count() or 1)
        scripts = ["-b", "tpcb-like"]
        if workload == "mixed":
            script = self.workdir / "filler.sql"
            if not script.exists():
                script.write_text(FILLER_SCRIPT)
                script.chmod(0o644)
            scripts = ["-b", "tpcb-like@1", "-f", f"{script}@1"]
        result = run(as_db_user(["env", f"PGOPTIONS={PGBENCH_OPTIONS}", pg_tool("pgbench"), "-n", "-M", "prepared",
                                 *scripts, "-T", str(max(1, round(seconds))), "-c", str(clients), "-j", str(threads),
                                 "-h", "127.0.0.1", "-p", str(self.instance.port), "-U", "postgres", DATABASE]),
                     what="pgbench", timeout=seconds + 600)
        match = re.search(r"tps = ([\d.]+)", result.stdout)
        return {"tps": float(match.group(1)) if match else 0.0}


# ---- one backend -------------------------------------------------------------------------------------

@dataclass
class Restored:
    restore_s: float
    recovery_s: float
    peak_rss: int
    fetch_calls: int = 0
    fetch_failed: int = 0  # non-zero exits: a file that is not in the archive (normal at the end of it)
    fetch_median_ms: float | None = None
    fetch_p99_ms: float | None = None

    @property
    def total_s(self) -> float:
        return self.restore_s + self.recovery_s


def stop_pusher(config: Path) -> None:
    """SIGTERM the archive.background pusher of config's spool, if one runs, and wait for it to go."""
    from pgvault.spool import lock_holder, push_spool

    lock = push_spool(config) / "pusher.lock"
    pid = lock_holder(lock)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while lock_holder(lock) is not None and time.monotonic() < deadline:
            time.sleep(0.1)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def read_timings(path: Path) -> tuple[list[float], int]:
    """The timing shim's log: each call's milliseconds, and how many calls exited non-zero."""
    calls = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(float(c[1]) - float(c[0])) * 1000 for c in calls], sum(1 for c in calls if c[2] != "0")


def unquote_setting(raw: str) -> str:
    """A value as postgresql.auto.conf holds it (ALTER SYSTEM's quoting), back to the text."""
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1].replace("''", "'").replace("\\\\", "\\")
    return raw


class BackendRun:
    """Every phase on one backend: fresh repositories for both tools, measured one after the other."""

    def __init__(self, backend: str, cluster: Cluster, resources: Resources, args: argparse.Namespace,
                 results: Results, s3: S3Endpoint | None) -> None:
        self.backend, self.cluster, self.resources, self.args, self.results = backend, cluster, resources, args, results
        self.workdir = cluster.workdir
        self.raw: dict[str, Any] = results.raw.setdefault(backend, {})
        instance = cluster.instance
        self.pgvault = Pgvault(self.workdir, backend, instance, s3)
        self.pgbackrest = PgBackRest(self.workdir, backend, instance, s3)
        self.shim = self.workdir / "timed.sh"
        self.shim.write_text(TIMING_SHIM)
        self.shim.chmod(0o755)
        self.look_ahead = policy_accepts("archive", "look_ahead", 0)
        self.background = policy_accepts("archive", "background", True)
        self.prefetch = policy_accepts("restore", "prefetch", 0)
        # The same data for each backend, as far as pgbench's own tables allow (they grow a little per run).
        cluster.reset_filler()
        instance.psql("CHECKPOINT")
        self.pgvault.init()
        self.pgbackrest.init()
        self.dual = f"{self.pgvault.archive_command()} && {self.pgbackrest.archive_command()}"
        cluster.set_archive_command(self.dual)
        cluster.switch_and_drain()

    def figure(self, label: str, unit: str, pgvault: float | None, pgbackrest: float | None, **more: Any) -> None:
        self.results.figures.append(Figure(self.backend, label, unit, pgvault, pgbackrest, **more))

    # -- backup ------------------------------------------------------------------------------------------

    def backups(self, report: bool) -> None:
        measured: dict[str, dict[str, Any]] = {}
        for tool, command in ((self.pgvault, self.pgvault.archive_command()),
                              (self.pgbackrest, self.pgbackrest.archive_command())):
            self.cluster.set_archive_command(command)
            self.cluster.switch_and_drain()
            self.cluster.warm_cache()
            os.sync()
            before = tool.repo_bytes()
            log(f"[{self.backend}] backup: {tool.name}")
            run_, info = tool.backup()
            stored = tool.repo_bytes() - before
            measured[tool.name] = {"wall_s": run_.wall_s, "repo_bytes": stored, "peak_rss": run_.peak_rss,
                                   "rss_samples": run_.samples, **info}
            log(f"[{self.backend}]   {run_.wall_s:.1f} s, {stored / MIB:.1f} MiB in the repository "
                f"({info['raw_bytes'] / MIB:.0f} MiB raw), peak RSS {run_.peak_rss / MIB:.1f} MiB")
        self.raw["backup"] = measured
        if not report:
            return
        v, b = measured["pgvault"], measured["pgBackRest"]
        ratio = v["wall_s"] / b["wall_s"]
        self.figure("backup wall time", "s", v["wall_s"], b["wall_s"], target="≤ 1.0×", met=ratio <= 1.0)
        self.figure("backup size in the repository", "MiB", v["repo_bytes"] / MIB, b["repo_bytes"] / MIB,
                    note=f"raw {v['raw_bytes'] / MIB:.0f} / {b['raw_bytes'] / MIB:.0f} MiB")
        self.figure("backup peak RSS (process tree)", "MiB", v["peak_rss"] / MIB, b["peak_rss"] / MIB,
                    target=RSS_TARGET, met=v["peak_rss"] < 300e6)

    # -- restore -----------------------------------------------------------------------------------------

    def restored_copy(self, name: str, restore: Callable[[Path], Any]) -> Restored:
        """Restore into a fresh directory, start it, wait until promoted (recovery done), stop and remove it."""
        db_user_dir(self.workdir / "restore")
        dest = db_user_dir(self.workdir / "restore" / name)
        os.sync()
        measured = restore(dest)
        timing = self.time_restore_command(dest, f"fetch-{self.backend}-{name}")
        copy = LocalInstance.existing(dest)
        self.resources.add(lambda: copy.stop("immediate"))
        started = time.monotonic()
        copy.start(wait=False)
        copy.wait_promoted(timeout=RECOVERY_TIMEOUT)
        recovery = time.monotonic() - started
        copy.stop("immediate")
        shutil.rmtree(dest)
        copy.log_path.unlink(missing_ok=True)
        latencies, failed = read_timings(timing)
        return Restored(measured.wall_s, recovery, measured.peak_rss, fetch_calls=len(latencies), fetch_failed=failed,
                        fetch_median_ms=statistics.median(latencies) if latencies else None,
                        fetch_p99_ms=quantile(latencies, 0.99) if latencies else None)

    def time_restore_command(self, pgdata: Path, name: str) -> Path:
        """Run the restore_command the tool wrote through the timing shim (same few ms for both tools)."""
        timing = self.workdir / f"{name}.log"
        timing.write_text("")
        chown_to_db_user(timing)
        raw = read_auto_conf(pgdata).get("restore_command")
        if raw is not None:
            command = shlex.join(["/bin/bash", str(self.shim), str(timing)]) + " " + unquote_setting(raw)
            set_auto_conf(pgdata, {"restore_command": command})
        return timing

    def restores(self) -> None:
        measured: dict[str, Restored] = {}
        log(f"[{self.backend}] restore: pgvault (target immediate)")
        measured["pgvault"] = self.restored_copy("pgvault", lambda d: self.pgvault.restore(d, immediate=True))
        log(f"[{self.backend}] restore: pgBackRest (type immediate)")
        measured["pgBackRest"] = self.restored_copy("pgbackrest", lambda d: self.pgbackrest.restore(d, immediate=True))
        for name, r in measured.items():
            log(f"[{self.backend}]   {name}: restore {r.restore_s:.1f} s + recovery {r.recovery_s:.1f} s, "
                f"peak RSS {r.peak_rss / MIB:.1f} MiB; {r.fetch_calls} restore_command calls, "
                f"median {r.fetch_median_ms or 0:.0f} ms")
        self.raw["restore"] = {k: {**asdict(r), "total_s": r.total_s} for k, r in measured.items()}
        v, b = measured["pgvault"], measured["pgBackRest"]
        self.figure("restore wall time (restore + recovery to consistency)", "s", v.total_s, b.total_s,
                    target="≤ 1.0×", met=v.total_s / b.total_s <= 1.0,
                    note=f"restore+recovery {v.restore_s:.1f}+{v.recovery_s:.1f} / "
                         f"{b.restore_s:.1f}+{b.recovery_s:.1f} s; "
                         f"{v.fetch_calls} / {b.fetch_calls} restore_command calls")
        self.figure("restore peak RSS (process tree)", "MiB", v.peak_rss / MIB, b.peak_rss / MIB,
                    target=RSS_TARGET, met=v.peak_rss < 300e6)

    # -- archiving ---------------------------------------------------------------------------------------

    def archive_variant(self, name: str, command: str) -> dict[str, Any]:
        cluster = self.cluster
        timing = self.workdir / f"archive-{self.backend}-{name.replace(' ', '-')}.log"
        timing.touch()
        chown_to_db_user(timing)
        cluster.set_archive_command(shlex.join(["/bin/bash", str(self.shim), str(timing)]) + " " + command)
        cluster.switch_and_drain()
        timing.write_text("")  # only the calls under load
        cluster.reset_filler()
        cluster.instance.psql("CHECKPOINT")  # each variant starts with the same full-page-write pattern
        log(f"[{self.backend}] archive: {name}, pgbench for {self.args.pgbench_seconds:g} s")
        before, lsn_before = cluster.archiver(), cluster.lsn()
        started = time.monotonic()
        bench = cluster.pgbench(self.args.pgbench_seconds, self.args.clients, self.args.workload)
        window = time.monotonic() - started
        after, lsn_after, ready = cluster.archiver(), cluster.lsn(), cluster.ready()
        drain = cluster.drain(timeout=max(900, 20 * self.args.pgbench_seconds))
        latencies, failed_calls = read_timings(timing)
        result = {
            "window_s": window, "tps": bench["tps"],
            "wal_segments_written": (lsn_after - lsn_before) / SEGMENT,
            "segments_archived": after["archived"] - before["archived"],
            "segments_per_s": (after["archived"] - before["archived"]) / window,
            "ready_at_end": ready, "drain_s": drain,
            "failures": after["failed"] - before["failed"], "failed_calls": failed_calls,
            "calls": len(latencies),
            "latency_median_ms": statistics.median(latencies) if latencies else None,
            "latency_p99_ms": quantile(latencies, 0.99) if latencies else None,
        }
        log(f"[{self.backend}]   {result['segments_per_s']:.2f} segments/s archived "
            f"({result['wal_segments_written']:.1f} written, {bench['tps']:.0f} tps), {ready} .ready at the end, "
            f"drained in {drain:.1f} s, {len(latencies)} calls, median {result['latency_median_ms'] or 0:.0f} ms, "
            f"p99 {result['latency_p99_ms'] or 0:.0f} ms, {result['failures']} failures")
        return result

    def archiving(self) -> None:
        variants: dict[str, dict[str, Any]] = {}
        if self.look_ahead:
            sync = self.pgvault.policy("sync", archive={"look_ahead": 0})
            variants["pgvault sync"] = self.archive_variant("pgvault sync", self.pgvault.archive_command(sync))
            variants["pgvault look-ahead"] = self.archive_variant("pgvault look-ahead", self.pgvault.archive_command())
        else:
            self.results.note("this pgvault rejects archive.look_ahead: it has no look-ahead, so its default is "
                              "measured as the sync variant and the look-ahead variant is skipped")
            variants["pgvault sync"] = self.archive_variant("pgvault sync", self.pgvault.archive_command())
        if self.background:
            background = self.pgvault.policy("background", archive={"background": True})
            try:
                variants["pgvault background"] = self.archive_variant(
                    "pgvault background", self.pgvault.archive_command(background))
            finally:
                stop_pusher(background)  # it would go on pushing (for up to look_ahead segments) into the next variant
        variants["pgBackRest sync"] = self.archive_variant("pgBackRest sync", self.pgbackrest.archive_command())
        variants["pgBackRest async"] = self.archive_variant(
            "pgBackRest async", self.pgbackrest.archive_command(asynchronous=True))
        self.raw["archive"] = variants

        # pgvault's asynchronous modes, each against pgBackRest's archive-async; the target applies to the
        # best of them (background when this pgvault has it).
        modes = [(name.removeprefix("pgvault "), variants[name])
                 for name in ("pgvault look-ahead", "pgvault background") if name in variants]
        modes = modes or [("sync (no look-ahead)", variants["pgvault sync"])]
        best = modes[-1][0]
        rows = (("archived under load", "segments_per_s", "seg/s"), (".ready left at the end", "ready_at_end", "files"),
                ("drain after the load", "drain_s", "s"), ("wal-push latency median", "latency_median_ms", "ms"),
                ("wal-push latency p99", "latency_p99_ms", "ms"))
        pairs = [("sync", variants["pgvault sync"], variants["pgBackRest sync"], "pgvault sync / pgBackRest sync")]
        pairs += [(mode, v, variants["pgBackRest async"], f"pgvault {mode} / pgBackRest async") for mode, v in modes]
        for label, key, unit in rows:
            for mode, v, b, names in pairs:
                more: dict[str, Any] = {}
                if mode == best and key == "segments_per_s":
                    more = {"target": "≥ 1.0×", "met": v[key] >= b[key]}
                elif mode == "look-ahead" and key == "latency_median_ms":
                    # Mostly fast-path calls; a background call waits while the pusher pushes its segment.
                    more = {"target": "pgvault ≤ 50 ms", "met": v[key] is not None and v[key] <= 50}
                if key in ("ready_at_end", "drain_s"):
                    more["comparable"] = False  # often 0 for one tool: a ratio would say nothing
                if key == "segments_per_s":
                    more["note"] = (f"written {v['wal_segments_written'] / v['window_s']:.2f} / "
                                    f"{b['wal_segments_written'] / b['window_s']:.2f} seg/s, "
                                    f"{v['tps']:.0f} / {b['tps']:.0f} tps")
                self.figure(f"{label}, {mode}", unit, v[key], b[key], variants=names, **more)

    # -- replay ------------------------------------------------------------------------------------------

    def replay(self) -> None:
        cluster, instance = self.cluster, self.cluster.instance
        # Both repositories get every segment from here on, so either tool's backup below can replay it all.
        cluster.reset_filler()
        cluster.set_archive_command(self.dual)
        cluster.switch_and_drain()
        log(f"[{self.backend}] replay: a backup with each tool (not measured)")
        self.pgvault.backup()
        self.pgbackrest.backup()
        start = cluster.lsn()
        wanted = self.args.wal_gb * 1024 * MIB
        log(f"[{self.backend}] replay: writing {self.args.wal_gb:g} GB of WAL with pgbench")
        rate: float | None = None  # bytes of WAL per second, from the previous round
        while (done := cluster.lsn() - start) < wanted:
            seconds = 5.0 if rate is None else min(30.0, max(2.0, (wanted - done) / rate))
            began = time.monotonic()
            cluster.pgbench(seconds, self.args.clients, self.args.workload)
            rate = max(1.0, (cluster.lsn() - start - done) / (time.monotonic() - began))
            log(f"[{self.backend}]   {(cluster.lsn() - start) / MIB:.0f} MiB of WAL")
        cluster.switch_and_drain(timeout=3600)
        wal_bytes = cluster.lsn() - start
        instance.stop()  # the copies recover alone on the machine
        try:
            variants: dict[str, Restored] = {}
            pgvault_variants: list[tuple[str, Path]] = []
            if self.prefetch:
                pgvault_variants.append(("pgvault without prefetch",
                                         self.pgvault.policy("noprefetch", restore={"prefetch": 0})))
                pgvault_variants.append(("pgvault with prefetch", self.pgvault.config))
            else:
                self.results.note("this pgvault rejects restore.prefetch: it has no prefetch, so its default is "
                                  "measured as the no-prefetch variant and the prefetch variant is skipped")
                pgvault_variants.append(("pgvault without prefetch", self.pgvault.config))
            for name, config in pgvault_variants:
                log(f"[{self.backend}] replay: {name}")
                variants[name] = self.restored_copy(
                    name.replace(" ", "-"), lambda d, c=config: self.pgvault.restore(d, immediate=False, config=c))
            for name, asynchronous in (("pgBackRest archive-get sync", False), ("pgBackRest archive-get async", True)):
                log(f"[{self.backend}] replay: {name}")
                self.pgbackrest.clear_get_queue()
                variants[name] = self.restored_copy(
                    name.replace(" ", "-"),
                    lambda d, a=asynchronous: self.pgbackrest.restore(d, immediate=False, asynchronous_get=a))
        finally:
            instance.start()
        for name, r in variants.items():
            log(f"[{self.backend}]   {name}: restore {r.restore_s:.1f} s, replay {r.recovery_s:.1f} s "
                f"({wal_bytes / MIB / r.recovery_s:.1f} MiB/s); {r.fetch_calls} restore_command calls, "
                f"median {r.fetch_median_ms or 0:.0f} ms, p99 {r.fetch_p99_ms or 0:.0f} ms")
        self.raw["replay"] = {"wal_bytes": wal_bytes,
                              **{k: {**asdict(r), "wal_mib_per_s": wal_bytes / MIB / r.recovery_s}
                                 for k, r in variants.items()}}
        off, sync = variants["pgvault without prefetch"], variants["pgBackRest archive-get sync"]
        on, asy = variants.get("pgvault with prefetch"), variants["pgBackRest archive-get async"]
        pairs = [("no prefetch / sync get", off, sync)] + ([("prefetch / async get", on, asy)] if on else [])
        for mode, v, b in pairs:
            self.figure(f"replay of {wal_bytes / MIB:.0f} MiB WAL, {mode}", "s", v.recovery_s, b.recovery_s,
                        note=f"{wal_bytes / MIB / v.recovery_s:.1f} / {wal_bytes / MIB / b.recovery_s:.1f} MiB/s")
        for mode, v, b in pairs:
            self.figure(f"restore_command median, {mode}", "ms", v.fetch_median_ms, b.fetch_median_ms,
                        note=f"{v.fetch_calls} / {b.fetch_calls} calls, p99 {v.fetch_p99_ms or 0:.0f} / "
                             f"{b.fetch_p99_ms or 0:.0f} ms")
        speedup = off.recovery_s / on.recovery_s if on is not None else None
        target = {"target": "pgvault ≥ 3×", "met": speedup is not None and speedup >= 3} if self.backend == "s3" else {}
        self.figure("replay speed-up (without / with prefetch; sync / async get)", "×", speedup,
                    sync.recovery_s / asy.recovery_s, comparable=False, **target)


# ---- the report ---------------------------------------------------------------------------------------

def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("ms",) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if unit in ("seg/s", "×") else f"{value:.1f}"


def print_table(results: Results) -> None:
    header = ("backend", "figure", "unit", "pgvault", "pgBackRest", "ratio", "target", "met", "detail")
    rows = []
    for f in results.figures:
        ratio = f"{f.ratio:.2f}×" if f.ratio is not None else ""
        met = "" if f.met is None else ("yes" if f.met else "NO")
        detail = "; ".join(x for x in (f.variants, f.note) if x)
        rows.append((f.backend, f.label, f.unit, fmt(f.pgvault, f.unit), fmt(f.pgbackrest, f.unit), ratio, f.target,
                     met, detail))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    for n in results.notes:
        print(f"note: {n}")


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="database size to load, GB (default 2)")
    parser.add_argument("--pgbench-seconds", type=float, default=60.0,
                        help="length of each archiving run under pgbench, seconds (default 60)")
    parser.add_argument("--wal-gb", type=float, default=1.0, help="WAL to replay in the replay phase, GB (default 1)")
    parser.add_argument("--clients", type=int, default=2 * cores,
                        help=f"pgbench clients (default 2 per core: {2 * cores})")
    parser.add_argument("--workload", choices=("mixed", "tpcb"), default="mixed",
                        help="pgbench transactions: tpcb-like mixed 1:1 with 100-row inserts (default), or "
                        "tpcb-like only")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases to run, comma-separated: {','.join(PHASES)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="file, s3 or both (default file,s3)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="also write every figure and raw measurement")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.only or set(args.only) - set(PHASES):
        parser.error(f"--only takes phases from: {', '.join(PHASES)}")
    if not args.backends or set(args.backends) - set(BACKENDS):
        parser.error(f"--backends takes: {', '.join(BACKENDS)}")
    if args.size_gb <= 0 or args.pgbench_seconds < 1 or args.wal_gb <= 0 or args.clients < 1:
        parser.error("--size-gb and --wal-gb must be positive, --pgbench-seconds and --clients at least 1")
    return args


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        return "?"

    here = str(Path(__file__).resolve().parent)
    return {"pgvault": first_line([PGVAULT, "--version"]), "pgbackrest": first_line(["pgbackrest", "version"]),
            "checkout": first_line(["git", "-C", here, "describe", "--always", "--dirty"]),
            "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "postgres": first_line([pg_tool("postgres"), "--version"]), "cpus": str(os.cpu_count()),
            "compression": f"zstd level {BACKUP_LEVEL} (backup), {ARCHIVE_LEVEL} (WAL)"}


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def bench(args: argparse.Namespace, resources: Resources, results: Results) -> None:
    workdir = resources.workdir
    # pgvault's look-ahead and prefetch spools go inside the work directory (inherited by the server).
    os.environ["PGVAULT_SPOOL_DIR"] = str(db_user_dir(workdir / "spool"))
    log(f"cluster: initdb in {workdir}")
    cluster = Cluster(workdir, resources)
    results.meta["data"] = cluster.fill(args.size_gb)
    log(f"cluster: database {results.meta['data']['database_mib']:.0f} MiB")
    cluster.enable_archiving()
    for backend in args.backends:
        s3 = None
        if backend == "s3":
            s3 = S3Endpoint(workdir)
            resources.add(s3.stop)
        started = time.monotonic()
        log(f"[{backend}] repositories")
        phases = BackendRun(backend, cluster, resources, args, results, s3)
        if "backup" in args.only or "restore" in args.only:
            phases.backups(report="backup" in args.only)
        if "restore" in args.only:
            phases.restores()
        if "archive" in args.only:
            phases.archiving()
        if "replay" in args.only:
            phases.replay()
        if s3 is not None:
            s3.stop()
        results.meta[f"{backend}_duration_s"] = time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if pgbackrest_binary() is None:
        print("pgBackRest is not installed; install it first: apt-get install pgbackrest", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupted)
    # Ctrl-C must clean up even when started with SIGINT ignored (e.g. `cmd &` from a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results = Results(meta={"args": {k: v for k, v in vars(args).items() if k != "json_out"}, **versions()})
    started = time.monotonic()
    workdir = make_workdir()
    resources = Resources(workdir)
    try:
        bench(args, resources, results)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; cleaning up")
        return 130
    except (PgvaultError, RuntimeError, subprocess.SubprocessError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        resources.close()
    results.meta["duration_s"] = time.monotonic() - started
    results.meta["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"done in {results.meta['duration_s'] / 60:.1f} min")
    print(f"pgvault vs pgBackRest ({', '.join(args.only)}; {', '.join(args.backends)}): {args.size_gb:g} GB database "
          f"({results.meta['data']['database_mib']:.0f} MiB), {args.pgbench_seconds:g} s pgbench runs "
          f"({args.workload}, {args.clients} clients), {args.wal_gb:g} GB WAL to replay; {results.meta['cpus']} CPUs; "
          f"{results.meta['compression']}; pgBackRest process-max={os.cpu_count()}")
    print_table(results)
    if args.json_out:
        payload = {"meta": results.meta, "notes": results.notes, "raw": results.raw,
                   "figures": [{**asdict(f), "ratio": f.ratio} for f in results.figures]}
        Path(args.json_out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
