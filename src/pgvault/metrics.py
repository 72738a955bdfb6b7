"""Prometheus metrics of one cluster's repository: backups, WAL archiving, windows, verify and drills.

Everything is read from the repository, the one place that knows what is really recoverable:
`collect` takes a `Snapshot` (I/O), `families` turns a snapshot into metric families (pure; the
WAL lag is computed here, at scrape time, so a cached snapshot still gives a current lag).
`serve` exposes them over HTTP for `schedule run`, collecting at most once per `cache_seconds`
so that scrapes do not turn into a stream of S3 listings.

Every metric is named `pgvault_*` and labelled `cluster` (windows also `timeline`). Values are
names, sizes, times and counts only: nothing from the policy's connection settings or
credentials reaches a metric (guarantee 10).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pgvault.errors import ConfigError, PgvaultError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from pgvault.config import Policy
    from pgvault.repo.base import Storage

log = logging.getLogger("pgvault.metrics")

CACHE_SECONDS = 30.0

# name -> help. The alert rules in compose/prometheus/alerts.yml use these names; a test holds them to it.
METRICS: dict[str, str] = {
    "pgvault_backups": "Valid backups (with a sentinel) in the repository.",
    "pgvault_last_backup_timestamp_seconds": "Stop time of the newest valid backup (Unix time).",
    "pgvault_last_backup_size_bytes": "Stored (compressed) size of the newest valid backup.",
    "pgvault_last_backup_raw_size_bytes": "Uncompressed size of the newest valid backup.",
    "pgvault_last_backup_duration_seconds": "How long the newest valid backup took.",
    "pgvault_wal_last_archived_timestamp_seconds": "When the newest object under wal/ was stored (Unix time, "
                                                   "the repository's clock).",
    "pgvault_wal_archive_lag_seconds": "Seconds since the newest object under wal/ was stored, at scrape time.",
    "pgvault_repository_bytes": "Bytes stored under the cluster's prefix of the repository.",
    "pgvault_recoverable_window_start_timestamp_seconds": "Earliest moment a restore on this timeline can reach: "
                                                          "the stop time of its oldest usable backup (Unix time).",
    "pgvault_recoverable_window_end_timestamp_seconds": "Latest moment a restore on this timeline can reach: the "
                                                        "last archived commit (Unix time).",
    "pgvault_verify_last_success": "1 if the newest verify report found the repository sound, else 0.",
    "pgvault_verify_last_timestamp_seconds": "When the newest verify run finished (Unix time).",
    "pgvault_drill_last_success": "1 if the newest DR drill passed, else 0.",
    "pgvault_drill_last_timestamp_seconds": "When the newest DR drill finished (Unix time).",
    "pgvault_drill_last_rto_seconds": "Recovery time of the newest DR drill: start of restore to a usable server.",
    "pgvault_drill_last_rpo_seconds": "Recovery point of the newest DR drill: data it could not recover, in seconds.",
    "pgvault_collect_success": "1 if the last read of the repository for these metrics succeeded, else 0.",
    "pgvault_collect_timestamp_seconds": "When the values shown were read from the repository (Unix time).",
    "pgvault_collect_duration_seconds": "How long reading the repository for these metrics took.",
}


@dataclass(frozen=True)
class LastBackup:
    id: str
    stop_time: datetime
    stored_size: int
    raw_size: int
    duration_s: float


@dataclass(frozen=True)
class WindowEdges:
    timeline: int
    start: datetime | None
    end: datetime | None  # the last archived commit; None when none followed the backup yet


@dataclass(frozen=True)
class ReportSummary:
    """The part of a verify or drill report that metrics show."""

    ok: bool | None
    finished: datetime | None
    rto_seconds: float | None = None
    rpo_seconds: float | None = None


@dataclass(frozen=True)
class Snapshot:
    cluster: str
    collected_at: datetime
    collect_seconds: float
    backups: int
    last_backup: LastBackup | None
    wal_last_archived: datetime | None
    repository_bytes: int
    windows: list[WindowEdges] = field(default_factory=list)
    verify: ReportSummary | None = None
    drill: ReportSummary | None = None

    def wal_lag(self, now: float) -> float | None:
        if self.wal_last_archived is None:
            return None
        # The stored time is the repository's clock (S3's LastModified); clock skew must not go negative.
        return max(0.0, now - self.wal_last_archived.timestamp())

    def as_dict(self, now: float) -> dict[str, Any]:
        """The `metrics --json` shape."""
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment is not None else None

        def report(summary: ReportSummary | None, drill: bool) -> dict[str, Any] | None:
            if summary is None:
                return None
            data: dict[str, Any] = {"ok": summary.ok, "finished": iso(summary.finished)}
            if drill:
                data.update(rto_seconds=summary.rto_seconds, rpo_seconds=summary.rpo_seconds)
            return data

        last = self.last_backup
        return {
            "cluster": self.cluster,
            "collected_at": iso(self.collected_at),
            "backups": self.backups,
            "last_backup": None if last is None else {
                "id": last.id, "stop_time": iso(last.stop_time), "stored_size": last.stored_size,
                "raw_size": last.raw_size, "duration_s": last.duration_s},
            "wal": {"last_archived": iso(self.wal_last_archived), "lag_seconds": self.wal_lag(now)},
            "repository_bytes": self.repository_bytes,
            "windows": [{"timeline": w.timeline, "start": iso(w.start), "end": iso(w.end)} for w in self.windows],
            "verify": report(self.verify, drill=False),
            "drill": report(self.drill, drill=True),
        }


# Collecting (I/O) -----------------------------------------------------------------------------


def collect(policy: Policy, storage: Storage, *, waldump: str | None = None) -> Snapshot:
    """Read everything the metrics show from the repository. Raises PgvaultError when it cannot."""
    from pgvault.catalog import Catalog
    from pgvault.recoverable import Recoverable
    from pgvault.repo.layout import Layout

    started = time.monotonic()
    collected_at = datetime.now(UTC)
    cluster = policy.cluster
    layout = Layout(cluster)
    info = Catalog(storage, cluster).require_cluster_info()

    # One listing gives both the repository's size and the newest archived WAL object.
    repository_bytes = 0
    newest_wal: float | None = None
    for obj in storage.list(f"{cluster}/"):
        repository_bytes += obj.size
        modified = getattr(obj, "modified", None)
        if obj.key.startswith(layout.wal_prefix) and modified is not None:
            newest_wal = modified if newest_wal is None else max(newest_wal, modified)

    from pgvault.pg.waldump import waldump_path

    view = Recoverable(storage, cluster, waldump or waldump_path(policy.postgres.bindir, info.pg_version))
    last = max(view.backups, key=lambda b: b.stop_time, default=None)
    windows = []
    for timeline in view.timelines():
        window = view.window(timeline)
        if window.earliest_time is not None:  # a timeline no backup reaches has no window
            windows.append(WindowEdges(timeline, window.earliest_time, window.latest_time))

    verify = _summary(_latest_report("pgvault.verify", "latest_verify_report", storage, cluster))
    drill = _summary(_latest_report("pgvault.drill", "latest_drill_report", storage, cluster))
    return Snapshot(
        cluster=cluster, collected_at=collected_at, collect_seconds=time.monotonic() - started,
        backups=len(view.backups),
        last_backup=None if last is None else LastBackup(last.id, last.stop_time, last.stored_size,
                                                         last.raw_size, last.duration_s),
        wal_last_archived=None if newest_wal is None else datetime.fromtimestamp(newest_wal, UTC),
        repository_bytes=repository_bytes, windows=windows, verify=verify, drill=drill,
    )


def _latest_report(module: str, function: str, storage: Storage, cluster: str) -> dict[str, Any] | None:
    """The newest report of verify or drill, or None when that feature is not installed or never ran."""
    try:
        reader = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None
    except AttributeError:
        return None
    report = reader(storage, cluster)
    return report if isinstance(report, dict) else None


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _summary(report: dict[str, Any] | None) -> ReportSummary | None:
    if report is None:
        return None
    ok = report.get("ok")
    # verify reports say `finished`, drill reports `finished_at`.
    finished = report.get("finished", report.get("finished_at"))
    return ReportSummary(ok=bool(ok) if isinstance(ok, bool) else None, finished=_moment(finished),
                         rto_seconds=_number(report.get("rto_seconds")),
                         rpo_seconds=_number(report.get("rpo_seconds")))


# Metric families (pure) -----------------------------------------------------------------------


def families(cluster: str, snapshot: Snapshot | None, now: float) -> list[Metric]:
    """The metric families for snapshot; None means the last collection failed."""
    from prometheus_client.core import GaugeMetricFamily

    out: list[Metric] = []

    def gauge(name: str, value: float | None, **labels: str) -> None:
        if value is None:
            return  # unknown is absent, never a made-up 0
        family = next((f for f in out if f.name == name), None)
        if family is None:
            family = GaugeMetricFamily(name, METRICS[name], labels=["cluster", *labels])
            out.append(family)
        family.add_metric([cluster, *labels.values()], float(value))

    gauge("pgvault_collect_success", 0.0 if snapshot is None else 1.0)
    if snapshot is None:
        return out
    gauge("pgvault_collect_timestamp_seconds", snapshot.collected_at.timestamp())
    gauge("pgvault_collect_duration_seconds", snapshot.collect_seconds)
    gauge("pgvault_backups", snapshot.backups)
    last = snapshot.last_backup
    if last is not None:
        gauge("pgvault_last_backup_timestamp_seconds", last.stop_time.timestamp())
        gauge("pgvault_last_backup_size_bytes", last.stored_size)
        gauge("pgvault_last_backup_raw_size_bytes", last.raw_size)
        gauge("pgvault_last_backup_duration_seconds", last.duration_s)
    if snapshot.wal_last_archived is not None:
        gauge("pgvault_wal_last_archived_timestamp_seconds", snapshot.wal_last_archived.timestamp())
        gauge("pgvault_wal_archive_lag_seconds", snapshot.wal_lag(now))
    gauge("pgvault_repository_bytes", snapshot.repository_bytes)
    for window in snapshot.windows:
        timeline = str(window.timeline)
        gauge("pgvault_recoverable_window_start_timestamp_seconds",
              window.start.timestamp() if window.start else None, timeline=timeline)
        gauge("pgvault_recoverable_window_end_timestamp_seconds",
              window.end.timestamp() if window.end else None, timeline=timeline)
    for kind, summary in (("verify", snapshot.verify), ("drill", snapshot.drill)):
        if summary is None:
            continue
        gauge(f"pgvault_{kind}_last_success", None if summary.ok is None else float(summary.ok))
        gauge(f"pgvault_{kind}_last_timestamp_seconds", summary.finished.timestamp() if summary.finished else None)
    if snapshot.drill is not None:
        gauge("pgvault_drill_last_rto_seconds", snapshot.drill.rto_seconds)
        gauge("pgvault_drill_last_rpo_seconds", snapshot.drill.rpo_seconds)
    return out


class _Families:
    """A prometheus_client collector that yields fixed families (one rendering)."""

    def __init__(self, items: list[Metric]) -> None:
        self._items = items

    def collect(self) -> Iterator[Metric]:
        yield from self._items


def render(cluster: str, snapshot: Snapshot | None, now: float) -> str:
    """The Prometheus text exposition format of snapshot."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families(cluster, snapshot, now)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# Serving over HTTP ----------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9188' or '[::1]:9188' -> (host, port); ValueError saying what to write otherwise."""
    text = listen.strip()
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT; write e.g. 127.0.0.1:9188 (0.0.0.0:9188 for every "
                         "interface)")
    return host, int(port)


class CachedCollector:
    """Collects on scrape, at most once per cache_seconds; a failed collection is cached too."""

    def __init__(self, policy: Policy, storage: Storage, cache_seconds: float = CACHE_SECONDS) -> None:
        self.policy = policy
        self.storage = storage
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._read_at: float | None = None  # monotonic time of the last attempt
        self.collections = 0  # attempts so far (tests and logs)

    def snapshot(self) -> Snapshot | None:
        with self._lock:  # concurrent scrapes wait for one collection instead of each starting one
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self.cache_seconds:
                self._read_at = now
                self.collections += 1
                try:
                    self._snapshot = collect(self.policy, self.storage)
                except Exception as exc:
                    # A scrape must answer even when the repository does not: pgvault_collect_success 0
                    # says so, and an alert rule watches it.
                    from pgvault.redaction import redact

                    detail = exc.message if isinstance(exc, PgvaultError) else f"unexpected {type(exc).__name__}"
                    log.warning("metrics of cluster %s: cannot read the repository: %s", self.policy.cluster,
                                redact(detail))
                    self._snapshot = None
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self.policy.cluster, self.snapshot(), time.time())


@dataclass
class MetricsServer:
    """A running metrics endpoint; stop() ends it."""

    host: str
    port: int
    collector: CachedCollector
    _httpd: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(policy: Policy, storage: Storage, listen: str, *, cache_seconds: float = CACHE_SECONDS) -> MetricsServer:
    """Serve the metrics at http://listen/metrics from a background thread until stop().

    Port 0 picks a free port (MetricsServer.port tells which). Raises ConfigError when listen is
    not HOST:PORT or cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"schedule.metrics_listen: {exc}", hint="or set it to '' for no metrics server") from None
    collector = CachedCollector(policy, storage, cache_seconds)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}",
                          hint="set schedule.metrics_listen to a free HOST:PORT, or '' for no metrics server") from None
    thread.name = "pgvault-metrics"
    return MetricsServer(host, int(httpd.server_address[1]), collector, httpd, thread)
