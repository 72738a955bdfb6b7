"""Running a command while sampling the resident memory of its whole process tree (from /proc).

pgBackRest does its work in child processes (`backup:local`, `restore:local` workers, one per
process-max), so the peak RSS of the top process alone would flatter it; pgvault works in threads
of one process. Both are measured the same way here: every SAMPLE_INTERVAL the tree under the
started command is walked through /proc/*/stat and the RSS of its members summed (runuser, the
layer that switches to the postgres OS user, is left out). The peak of that sum is reported.

A sum of RSS counts shared pages (libraries, the interpreter's text) once per process, so it is an
upper bound of what the tree really holds; sampling can miss a peak shorter than the interval.
Standard library only, besides benchlib's process-group runner (itself standard library only).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from benchlib import process_group

SAMPLE_INTERVAL = 0.1  # seconds; a scan of /proc costs a few ms of CPU, so not much more often
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_NOT_COUNTED = {"runuser"}


@dataclass
class Measured:
    stdout: str
    stderr: str
    wall_s: float
    peak_rss: int  # bytes, summed over the tree, 0 if never sampled
    samples: int


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, RSS bytes, command name) for every process we can read."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        # fields[0] is field 3 of proc(5) (state): ppid is field 4, rss (pages) field 24.
        table[int(entry.name)] = (int(fields[1]), int(fields[21]) * PAGE_SIZE, comm)
    return table


def tree_rss(root: int) -> int:
    """Summed RSS of root and all its descendants (runuser excluded), in bytes."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _rss, _comm) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table and table[pid][2] not in _NOT_COUNTED:
            total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total


class TreeSampler(threading.Thread):
    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.root))
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_measured(cmd: list[str], *, what: str, timeout: float = 7200, check: bool = True) -> Measured:
    """Run cmd (in its own process group, killed whole on any interruption); wall time and peak tree RSS."""
    started = time.monotonic()
    with process_group(cmd) as proc:
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            sampler.stop()
    wall = time.monotonic() - started
    if check and proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stdout}{stderr}")
    return Measured(stdout, stderr, wall, sampler.peak, sampler.samples)
