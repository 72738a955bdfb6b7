"""verify: is everything in the repository what it claims to be, and what can it recover?

Three layers, each reading the data itself rather than trusting any metadata:

- objects: every part and manifest is read in full and its size and SHA-256 compared with what its
  sentinel (backup.json) records; every WAL object with its own recorded size and SHA-256, and its
  decompressed content with the recorded raw SHA-256 (segments also by their page header);
  cluster.json, sentinels and history files must parse.
- deep (--deep): every part is decompressed and unpacked as a stream, every member hashed and
  compared with PostgreSQL's own backup_manifest, the way pg_verifybackup checks a directory.
- WAL continuity: from each backup's start to the newest segment of every timeline, along the
  timeline's history; gaps are reported with the recoverable windows that remain.

Memory stays bounded: objects are streamed in chunks (manifests, which restore holds whole too, and
small JSON objects excepted). The report is stored in the repository for `latest_verify_report`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from pydantic import ValidationError

from pgvault.catalog import BackupRecord, ClusterInfo, StoredObject
from pgvault.config import Policy
from pgvault.errors import IntegrityError, ObjectExists, ObjectNotFound, PgvaultError, RepositoryError
from pgvault.pg.wal import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    TimelineSwitch,
    WalSegment,
    is_backup_history,
    is_history,
    is_partial,
    is_segment,
    parse_history,
    parse_long_header,
)
from pgvault.progress import meter
from pgvault.repo.base import ObjectMeta, Storage, read_verified
from pgvault.repo.layout import FORMAT_VERSION, Layout
from pgvault.window import TimelineSpan, ancestry, backup_on_path, reachable_backups

Progress = Callable[[str], None]
CHUNK = 1024 * 1024

# What pg_verifybackup does not expect in the manifest (its default ignore list, PostgreSQL 15:
# pg_verifybackup.c): a path equal to one of these or below it. It checks a directory a restore may
# have written into; parts are exactly what the server sent, so here the list only excuses members
# that the manifest lacks. Every file the manifest lists must be in a part and match.
MANIFEST_EXEMPT = ("backup_manifest", "pg_wal", "postgresql.auto.conf", "recovery.signal", "standby.signal")

# Problem kinds: what is wrong with the named object.
MISSING = "missing"  # referenced (by a sentinel, or by WAL continuity) but not stored
SIZE = "size"  # stored bytes of another length than recorded
CHECKSUM = "checksum"  # stored bytes with another SHA-256 than recorded
METADATA = "metadata"  # the object's own recorded size/SHA-256 disagrees with its bytes
CONTENT = "content"  # bytes as recorded, but the content is wrong (decompression, raw SHA-256, header)
PARSE = "parse"  # cluster.json, a sentinel or a history file does not parse
MANIFEST = "manifest"  # --deep: a file differs from PostgreSQL's backup_manifest
SENTINEL = "sentinel"  # a backup's sentinel is missing or contradicts the repository
GAP = "gap"  # WAL missing between a backup's start and the newest segment
UNUSABLE = "unusable"  # a backup cannot become consistent (its WAL is missing or damaged)
TIMELINE = "timeline"  # a timeline's history file is missing
UNREADABLE = "unreadable"  # the repository failed to deliver the object (permissions, the store erring)


def _quiet(_message: str) -> None:
    pass


# ---- the report ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    key: str  # the object concerned (for a gap: the first missing segment's key)
    kind: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"object": self.key, "kind": self.kind, "message": self.message}

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass(frozen=True)
class WalGap:
    """Segments missing in a row: recovery along `timelines` cannot pass them."""

    first: WalSegment
    last: WalSegment
    timelines: tuple[int, ...]

    @property
    def segments(self) -> int:
        return self.last.number - self.first.number + 1

    def as_dict(self) -> dict[str, Any]:
        return {"first": self.first.name, "last": self.last.name, "segments": self.segments,
                "timelines": list(self.timelines), "from_lsn": str(self.first.start_lsn),
                "to_lsn": str(self.last.end_lsn)}


@dataclass(frozen=True)
class VerifiedWindow:
    """One unbroken stretch a restore on `timeline` can reach: from the earliest backup of the group
    being consistent to the end of its WAL run. A gap splits a timeline into several windows."""

    timeline: int
    earliest_time: datetime
    earliest_lsn: Lsn
    wal_end: WalSegment  # the last segment of the unbroken, undamaged run
    backups: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "earliest_time": self.earliest_time.isoformat(),
                "earliest_lsn": str(self.earliest_lsn), "wal_end": self.wal_end.name,
                "wal_end_lsn": str(self.wal_end.end_lsn), "backups": list(self.backups)}


@dataclass
class VerifyReport:
    id: str
    cluster: str
    repository: str
    started: datetime
    deep: bool
    backup_id: str | None
    finished: datetime | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    backups: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[WalGap] = field(default_factory=list)
    windows: list[VerifiedWindow] = field(default_factory=list)
    report_key: str | None = None  # where the report was stored; None if storing failed

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "cluster": self.cluster, "repository": self.repository,
            "started": self.started.isoformat(), "finished": self.finished.isoformat() if self.finished else None,
            "duration_s": round((self.finished - self.started).total_seconds(), 3) if self.finished else None,
            "ok": self.ok, "deep": self.deep, "backup_id": self.backup_id,
            "problems": [p.as_dict() for p in self.problems], "warnings": list(self.warnings),
            "checked": dict(self.checked), "backups": list(self.backups),
            "gaps": [g.as_dict() for g in self.gaps], "windows": [w.as_dict() for w in self.windows],
            "report_key": self.report_key,
        }


@dataclass
class _Outcome:
    """What checking one object found."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    usable: bool = True  # intact: for WAL, whether recovery could use it
    vanished: bool = False  # listed, then gone when read (expired meanwhile): continuity decides
    seen: set[str] = field(default_factory=set)  # --deep: manifest paths found in this part

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


# ---- reading objects ------------------------------------------------------------------------------

class _Tee:
    """A read-only stream over a stored object that hashes and counts every byte read through it."""

    def __init__(self, handle: BinaryIO, advance: Callable[[int], None] | None = None) -> None:
        self._handle = handle
        self._advance = advance
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        """At most size bytes; at most one chunk when size is negative (never the whole object)."""
        data = self._handle.read(CHUNK if size is None or size < 0 else size)
        self.digest.update(data)
        self.size += len(data)
        if self._advance is not None and data:
            self._advance(len(data))
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _compare(out: _Outcome, key: str, size: int, sha256: str, meta: ObjectMeta,
             expected: StoredObject | None, whose: str) -> bool:
    """Check what was read against the record (the sentinel's, else the object's own metadata)."""
    record_size, record_sha = (expected.size, expected.sha256) if expected else (meta.size, meta.sha256)
    if size != record_size:
        out.problems.append(Problem(key, SIZE, f"{size} bytes stored, but {whose} records {record_size}"))
        return False
    if sha256 != record_sha:
        out.problems.append(Problem(key, CHECKSUM, f"SHA-256 {sha256[:16]}... of the stored bytes differs from "
                                    f"the {record_sha[:16]}... {whose} records"))
        return False
    if expected is not None and (meta.size != size or meta.sha256 != sha256):
        out.problems.append(Problem(key, METADATA, "the bytes match the sentinel, but the object's own recorded "
                                    "size/SHA-256 does not (its metadata or sidecar is damaged)"))
        return False
    return True


def _open(storage: Storage, key: str, out: _Outcome, missing: str) -> tuple[BinaryIO, ObjectMeta] | None:
    try:
        return storage.open(key)
    except ObjectNotFound:
        out.problems.append(Problem(key, MISSING, missing))
    except PgvaultError as exc:
        out.problems.append(Problem(key, UNREADABLE, f"cannot be read: {exc.message}"))
    return None


def _unreadable(out: _Outcome, key: str, exc: PgvaultError) -> None:
    out.problems.append(Problem(key, UNREADABLE, f"reading it failed: {exc.message}"))


def check_plain(storage: Storage, key: str, expected: StoredObject | None, *, what: str, whose: str,
                missing: str) -> _Outcome:
    """Read an object in full; compare size and SHA-256 with `expected` (else its own metadata)."""
    out = _Outcome()
    opened = _open(storage, key, out, missing)
    if opened is None:
        out.usable = False
        return out
    handle, meta = opened
    tee = _Tee(handle)
    try:
        with handle:
            tee.drain()
    except PgvaultError as exc:
        _unreadable(out, key, exc)
        out.usable = False
        return out
    out.count(what)
    out.count("bytes", tee.size)
    out.usable = _compare(out, key, tee.size, tee.digest.hexdigest(), meta, expected, whose)
    return out


def check_wal(storage: Storage, key: str, name: str, *, system_id: str | None, segment_size: int) -> _Outcome:
    """A WAL object: stored bytes against its metadata, content against raw_sha256 (and the page header)."""
    import zstandard

    out = _Outcome()
    try:
        handle, meta = storage.open(key)
    except ObjectNotFound:
        out.usable = False
        out.vanished = True
        return out
    except PgvaultError as exc:
        _unreadable(out, key, exc)
        out.usable = False
        return out
    tee = _Tee(handle)
    raw_digest = hashlib.sha256()
    raw_size = 0
    head = b""
    decode_error: str | None = None
    try:
        with handle:
            if is_history(name):
                stream: Any = tee  # .history files are stored as PostgreSQL wrote them
            else:
                stream = zstandard.ZstdDecompressor().stream_reader(tee, read_across_frames=True)  # type: ignore[arg-type]
            try:
                while chunk := stream.read(CHUNK):
                    if len(head) < 512:
                        head += chunk[:512 - len(head)]
                    raw_digest.update(chunk)
                    raw_size += len(chunk)
                    if is_history(name) and raw_size > 1024 * 1024:
                        decode_error = "is larger than any timeline history file"
                        break
            except zstandard.ZstdError as exc:
                decode_error = f"does not decompress: {exc}"
            tee.drain()
    except PgvaultError as exc:
        _unreadable(out, key, exc)
        out.usable = False
        return out
    out.count("wal_segments" if is_segment(name) else "wal_history" if is_history(name) else "wal_other")
    out.count("bytes", tee.size)
    out.count("wal_raw_bytes", raw_size)
    if not _compare(out, key, tee.size, tee.digest.hexdigest(), meta, None, "its metadata"):
        out.usable = False
        return out
    if decode_error is not None:
        out.problems.append(Problem(key, CONTENT, f"{name} {decode_error}"))
        out.usable = False
        return out
    recorded_raw = meta.extra.get("raw_sha256")
    if recorded_raw and raw_digest.hexdigest() != recorded_raw:
        out.problems.append(Problem(key, CONTENT, f"{name} decompresses to other content than was archived "
                                    "(raw SHA-256 differs)"))
        out.usable = False
        return out
    recorded_size = meta.extra.get("raw_size")
    if recorded_size and recorded_size.isdigit() and int(recorded_size) != raw_size:
        out.problems.append(Problem(key, CONTENT, f"{name} decompresses to {raw_size} bytes, but "
                                    f"{recorded_size} were archived"))
        out.usable = False
        return out
    if not recorded_raw:
        # A file-backend object whose writer died before its sidecar: complete, but unchecked content.
        out.warnings.append(f"{key}: no raw SHA-256 recorded; only its compressed bytes and header were checked")
    if is_segment(name) or is_partial(name):
        problem = _segment_header_problem(name, head, raw_size, system_id, segment_size)
        if problem:
            out.problems.append(Problem(key, CONTENT, problem))
            out.usable = False
    return out


def _segment_header_problem(name: str, head: bytes, size: int, system_id: str | None,
                            segment_size: int) -> str | None:
    if size != segment_size:
        return f"{name} holds {size} bytes, not the cluster's segment size {segment_size}"
    try:
        header = parse_long_header(head)
    except ValueError as exc:
        return f"{name} is not a WAL segment: {exc}"
    segment = WalSegment.parse(name.removesuffix(".partial"), segment_size)
    if system_id is not None and str(header.system_id) != system_id:
        return f"{name} belongs to database system {header.system_id}, not this cluster's {system_id}"
    # A new timeline's first segment starts as a copy of its parent's: its first page may carry an
    # older timeline, never a newer one.
    if header.page_address != segment.start_lsn or header.timeline > segment.timeline:
        return f"{name}'s page header says timeline {header.timeline} at {header.page_address}"
    return None


# ---- --deep: parts against PostgreSQL's backup_manifest -------------------------------------------

@dataclass(frozen=True)
class ManifestFile:
    size: int
    algorithm: str
    checksum: str


def _exempt(path: str) -> bool:
    return any(path == name or path.startswith(name + "/") for name in MANIFEST_EXEMPT)


def parse_manifest(data: bytes) -> tuple[dict[str, ManifestFile], list[dict[str, Any]], list[str]]:
    """PostgreSQL's backup_manifest: (files by path, WAL ranges, problems found in it)."""
    problems: list[str] = []
    # Manifest-Checksum covers every byte up to the newline that ends the line before its own line.
    body = data.rstrip(b"\n")
    cut = body.rfind(b"\n")
    try:
        manifest = json.loads(data)
    except ValueError:
        return {}, [], ["is not valid JSON"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("Files"), list):
        return {}, [], ["has no Files list"]
    recorded = manifest.get("Manifest-Checksum")
    if cut < 0 or hashlib.sha256(data[:cut + 1]).hexdigest() != recorded:
        problems.append("its Manifest-Checksum does not match its content")
    files: dict[str, ManifestFile] = {}
    for entry in manifest["Files"]:
        try:
            path = entry["Path"] if "Path" in entry else bytes.fromhex(entry["Encoded-Path"]).decode(
                "utf-8", "surrogateescape")
            item = ManifestFile(int(entry["Size"]), str(entry.get("Checksum-Algorithm", "NONE")),
                                str(entry.get("Checksum", "")).lower())
        except (KeyError, ValueError, TypeError):
            problems.append(f"has an unreadable file entry: {str(entry)[:120]}")
            continue
        if path in files:
            problems.append(f"lists {path} twice")
        files[path] = item
    ranges = manifest.get("WAL-Ranges")
    return files, ranges if isinstance(ranges, list) else [], problems


def check_part_deep(storage: Storage, part: StoredObject, tablespace: str | None,
                    files: Mapping[str, ManifestFile] | None, *,
                    advance: Callable[[int], None] | None = None) -> _Outcome:
    """Stream a part once: its stored bytes against the sentinel, and (with files) every member against
    PostgreSQL's manifest. Memory: one chunk of the part and of the member being hashed. advance(n) is
    told of every n stored bytes read (a progress meter)."""
    import zstandard

    out = _Outcome()
    key = part.key
    opened = _open(storage, key, out, "the sentinel lists this part, but it is not stored")
    if opened is None:
        out.usable = False
        return out
    handle, meta = opened
    tee = _Tee(handle, advance)
    # The manifest names a tablespace's files by their path through pg_tblspc.
    prefix = f"pg_tblspc/{tablespace}/" if tablespace else ""
    unpack_error: str | None = None
    try:
        with handle:
            stream = zstandard.ZstdDecompressor().stream_reader(tee, read_across_frames=True)  # type: ignore[arg-type]
            try:
                with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
                    for member in archive:
                        _check_member(out, key, archive, member, prefix, files)
            except (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError, UnicodeError) as exc:
                unpack_error = f"{type(exc).__name__}: {exc}"
            tee.drain()  # the checksum covers every stored byte, not only what tar needed
    except PgvaultError as exc:
        _unreadable(out, key, exc)
        out.usable = False
        return out
    out.count("parts")
    out.count("bytes", tee.size)
    out.usable = _compare(out, key, tee.size, tee.digest.hexdigest(), meta, part, "the sentinel")
    if unpack_error is not None:
        out.usable = False
        out.problems.append(Problem(key, CONTENT, f"does not decompress and unpack as a tar archive "
                                    f"({unpack_error})"))
    if not out.usable:
        # Member findings from damaged bytes would only repeat the damage, file by file.
        out.problems = [p for p in out.problems if p.kind != MANIFEST]
    return out


def _check_member(out: _Outcome, key: str, archive: tarfile.TarFile, member: tarfile.TarInfo, prefix: str,
                  files: Mapping[str, ManifestFile] | None) -> None:
    path = prefix + member.name.removeprefix("./").rstrip("/")
    if member.isdir():
        return  # the manifest lists files only, as pg_verifybackup walks them
    if not member.isreg():
        if files is not None and not _exempt(path):
            out.problems.append(Problem(key, MANIFEST, f"member {path} is not a regular file or directory"))
        return
    if path in out.seen and files is not None:
        out.problems.append(Problem(key, MANIFEST, f"file {path} appears twice in the part"))
    out.seen.add(path)
    source = archive.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    out.count("files")
    out.count("file_bytes", size)
    if files is None:
        return
    entry = files.get(path)
    if entry is None:
        if not _exempt(path):
            out.problems.append(Problem(key, MANIFEST, f"file {path} is in the backup but not in its manifest"))
        return
    if size != entry.size:
        out.problems.append(Problem(key, MANIFEST, f"file {path} has {size} bytes, the manifest says {entry.size}"))
    elif entry.algorithm == "SHA256" and digest.hexdigest() != entry.checksum:
        out.problems.append(Problem(key, MANIFEST, f"file {path}: checksum mismatch with the manifest "
                                    f"(SHA-256 {digest.hexdigest()[:16]}..., manifest {entry.checksum[:16]}...)"))


def read_small(storage: Storage, key: str, expected: StoredObject | None, out: _Outcome, *, what: str,
               whose: str, missing: str) -> bytes | None:
    """A small object (cluster.json, a sentinel, a manifest) read whole and checked; None if not intact."""
    opened = _open(storage, key, out, missing)
    if opened is None:
        return None
    handle, meta = opened
    try:
        with handle:
            data = handle.read()
    except PgvaultError as exc:
        _unreadable(out, key, exc)
        return None
    out.count(what)
    out.count("bytes", len(data))
    if not _compare(out, key, len(data), hashlib.sha256(data).hexdigest(), meta, expected, whose):
        return None
    return data


# ---- WAL continuity (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Continuity:
    gaps: list[WalGap]
    windows: list[VerifiedWindow]
    # backup id -> the first segment it needs to become consistent that is missing or damaged
    unusable: dict[str, WalSegment]


def _covers(span: TimelineSpan, number: int, segment_size: int) -> bool:
    """Does segment `number` hold WAL of span? (the rule window.wal_run follows)"""
    return span.begin.value < (number + 1) * segment_size and number * segment_size <= span.end.value


def _path_end(spans: Sequence[TimelineSpan], present: Mapping[int, set[int]], segment_size: int) -> int | None:
    ends = [n for span in spans for n in present.get(span.timeline, ()) if _covers(span, n, segment_size)]
    return max(ends) if ends else None


def _find(spans: Sequence[TimelineSpan], number: int, segments: Mapping[int, set[int]],
          segment_size: int) -> WalSegment | None:
    for span in reversed(spans):  # the newest timeline first, as recovery looks
        if _covers(span, number, segment_size) and number in segments.get(span.timeline, ()):
            return WalSegment(span.timeline, number, segment_size)
    return None


def _expected(spans: Sequence[TimelineSpan], number: int, segment_size: int) -> WalSegment:
    """The name recovery along spans would ask for first: the newest timeline covering `number`."""
    for span in reversed(spans):
        if _covers(span, number, segment_size):
            return WalSegment(span.timeline, number, segment_size)
    return WalSegment(spans[-1].timeline, number, segment_size)


def continuity(
    backups: Sequence[BackupRecord], histories: Mapping[int, list[TimelineSwitch]],
    present: Mapping[int, set[int]], usable: Mapping[int, set[int]], timelines: Iterable[int], segment_size: int,
) -> Continuity:
    """Gaps in the archived WAL from each backup's start to the newest segment of each timeline.

    `present` is what is stored, `usable` what is stored intact: gaps are missing segments, while
    windows and unusable backups also treat damaged segments as breaks.
    """
    gaps: dict[tuple[str, str], WalGap] = {}
    windows: list[VerifiedWindow] = []
    unusable: dict[str, WalSegment] = {}
    for timeline in sorted(set(timelines)):
        spans = ancestry(timeline, histories.get(timeline, []))
        on_path = [b for b in backups if backup_on_path(b, spans)]
        if not on_path:
            continue
        start = min(WalSegment.parse(b.start_wal, segment_size).number for b in on_path)
        ends = [WalSegment.parse(b.stop_wal, segment_size).number for b in on_path]
        archived_end = _path_end(spans, present, segment_size)
        end = max([*ends, *([archived_end] if archived_end is not None else [])])
        missing = [n for n in range(start, end + 1) if _find(spans, n, present, segment_size) is None]
        for run in _runs(missing):
            first, last = _expected(spans, run[0], segment_size), _expected(spans, run[-1], segment_size)
            previous = gaps.get((first.name, last.name))
            tls = (*previous.timelines, timeline) if previous else (timeline,)
            gaps[(first.name, last.name)] = WalGap(first, last, tls)
        reach = reachable_backups(on_path, spans, dict(usable), segment_size)
        reached = {r.backup.id for r in reach}
        for b in on_path:
            if b.timeline == timeline and b.id not in reached and b.id not in unusable:
                number = WalSegment.parse(b.start_wal, segment_size).number
                while _find(spans, number, usable, segment_size) is not None:
                    number += 1
                unusable[b.id] = _expected(spans, number, segment_size)
        groups: dict[int, list[BackupRecord]] = {}
        wal_end: dict[int, WalSegment] = {}
        for r in reach:
            groups.setdefault(r.wal_end.number, []).append(r.backup)
            wal_end[r.wal_end.number] = r.wal_end
        for number in sorted(groups):
            members = groups[number]
            first_backup = members[0]
            windows.append(VerifiedWindow(timeline, first_backup.stop_time, first_backup.stop, wal_end[number],
                                          tuple(b.id for b in members)))
    return Continuity(sorted(gaps.values(), key=lambda g: (g.first.number, g.first.timeline)), windows, unusable)


def _runs(numbers: Sequence[int]) -> Iterator[list[int]]:
    run: list[int] = []
    for n in numbers:
        if run and n != run[-1] + 1:
            yield run
            run = []
        run.append(n)
    if run:
        yield run


def segments_needed(backup: BackupRecord, histories: Mapping[int, list[TimelineSwitch]],
                    present: Mapping[int, set[int]], timelines: Iterable[int], segment_size: int) -> set[WalSegment]:
    """The stored segments recovery from `backup` could replay, on every timeline that descends from it."""
    needed: set[WalSegment] = set()
    start = WalSegment.parse(backup.start_wal, segment_size).number
    for timeline in timelines:
        spans = ancestry(timeline, histories.get(timeline, []))
        if not backup_on_path(backup, spans):
            continue
        for span in spans:
            for number in present.get(span.timeline, ()):
                if number >= start and _covers(span, number, segment_size):
                    needed.add(WalSegment(span.timeline, number, segment_size))
    return needed


# ---- the run ---------------------------------------------------------------------------------------

@dataclass
class _BackupDir:
    id: str
    keys: set[str]
    record: BackupRecord | None = None


def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


_REPORT_ID = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d+))?$")


def _report_order(report_id: str) -> tuple[str, int] | None:
    match = _REPORT_ID.match(report_id)
    return (match[1], int(match[2] or 1)) if match else None


class _Verifier:
    """One run's state: the report it fills and the repository it reads."""

    def __init__(self, policy: Policy, storage: Storage, report: VerifyReport, progress: Progress) -> None:
        self.storage = storage
        self.cluster = policy.cluster
        self.layout = Layout(policy.cluster)
        self.report = report
        self.progress = progress
        # Objects read at once: the same knob as restore's parallel part reads.
        self.parallel = policy.restore.parallel
        self.info: ClusterInfo | None = None
        self.segment_size = DEFAULT_SEGMENT_SIZE

    def absorb(self, outcome: _Outcome) -> None:
        self.report.problems.extend(outcome.problems)
        self.report.warnings.extend(outcome.warnings)
        for name, n in outcome.counts.items():
            self.report.checked[name] = self.report.checked.get(name, 0) + n

    def problem(self, key: str, kind: str, message: str) -> None:
        self.report.problems.append(Problem(key, kind, message))

    def run_all(self, jobs: Sequence[Callable[[], _Outcome]]) -> list[_Outcome]:
        if not jobs:
            return []
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            outcomes = list(pool.map(lambda job: job(), jobs))
        for outcome in outcomes:
            self.absorb(outcome)
        return outcomes

    def listed(self, key: str) -> bool:
        # list(), not head(): on a directory, a data file removed beside its sidecar still has a head.
        return any(obj.key == key for obj in self.storage.list(key))

    # cluster.json ------------------------------------------------------------------------------
    def check_cluster(self, stored: bool) -> None:
        key = self.layout.cluster_json
        if not stored:
            self.problem(key, MISSING, "the cluster record is missing (pgvault init writes it); WAL was checked "
                         "without the system id")
            return
        out = _Outcome()
        data = read_small(self.storage, key, None, out, what="cluster", whose="its metadata",
                          missing="the cluster record is missing (pgvault init writes it)")
        self.absorb(out)
        if data is None:
            return
        try:
            info = ClusterInfo.model_validate(json.loads(data))
        except (ValueError, ValidationError):
            self.problem(key, PARSE, "is not a pgvault cluster record")
            return
        if info.format != FORMAT_VERSION:
            self.problem(key, PARSE, f"is repository format {info.format}; this pgvault reads {FORMAT_VERSION}")
        if info.cluster != self.cluster:
            self.problem(key, PARSE, f"names cluster {info.cluster!r}, but is stored as {self.cluster!r}")
        self.info = info
        self.segment_size = info.wal_segment_size

    # backups -----------------------------------------------------------------------------------
    def read_sentinel(self, backup: _BackupDir) -> None:
        key = self.layout.sentinel_key(backup.id)
        out = _Outcome()
        data = read_small(self.storage, key, None, out, what="sentinels", whose="its metadata",
                          missing="listed, but gone when read")
        self.absorb(out)
        if data is None:
            return
        try:
            record = BackupRecord.model_validate(json.loads(data))
        except (ValueError, ValidationError):
            self.problem(key, PARSE, "is not a valid backup record; the backup cannot be restored")
            return
        wrong = []
        if record.format != FORMAT_VERSION:
            wrong.append(f"repository format {record.format}")
        if record.id != backup.id:
            wrong.append(f"id {record.id!r} (it is stored as {backup.id!r})")
        if record.cluster != self.cluster:
            wrong.append(f"cluster {record.cluster!r}")
        if self.info is not None and record.system_id != self.info.system_id:
            wrong.append(f"system id {record.system_id} (the cluster's is {self.info.system_id})")
        prefix = self.layout.backup_prefix(backup.id)
        if any(not obj.key.startswith(prefix) for obj in (*record.parts, record.manifest)):
            wrong.append("objects outside its backup directory")
        if wrong:
            self.problem(key, SENTINEL, "the sentinel names " + ", ".join(wrong))
            return
        backup.record = record

    def backup_jobs(self, backup: _BackupDir, deep: bool) -> list[Callable[[], _Outcome]]:
        sentinel = self.layout.sentinel_key(backup.id)
        record = backup.record
        if record is None:
            # No trustworthy sentinel: still check each object against its own metadata.
            return [lambda key=key: check_plain(self.storage, key, None, what="orphans", whose="its metadata",
                                                missing="listed, but gone when read")
                    for key in sorted(backup.keys - {sentinel})]
        referenced = {p.key for p in record.parts} | {record.manifest.key, sentinel}
        for key in sorted(backup.keys - referenced):
            self.report.warnings.append(f"{key}: stored in backup {backup.id} but not listed by its sentinel")
        if deep:
            return []  # the deep check streams each part once, checking its bytes too
        jobs: list[Callable[[], _Outcome]] = [
            lambda part=part: check_plain(self.storage, part.key, part, what="parts", whose="the sentinel",
                                          missing="the sentinel lists this part, but it is not stored")
            for part in record.parts
        ]
        jobs.append(lambda: check_plain(self.storage, record.manifest.key, record.manifest, what="manifests",
                                        whose="the sentinel",
                                        missing="the sentinel lists this manifest, but it is not stored"))
        return jobs

    def deep_backup(self, record: BackupRecord) -> None:
        import zstandard

        self.progress(f"verify: backup {record.id}: every file of {len(record.parts)} part(s) against its manifest")
        out = _Outcome()
        stored = read_small(self.storage, record.manifest.key, record.manifest, out, what="manifests",
                            whose="the sentinel", missing="the sentinel lists this manifest, but it is not stored")
        self.absorb(out)
        files: dict[str, ManifestFile] | None = None
        if stored is not None:
            try:
                files, ranges, troubles = parse_manifest(zstandard.ZstdDecompressor().decompress(stored))
            except zstandard.ZstdError as exc:
                self.problem(record.manifest.key, CONTENT, f"does not decompress: {exc}")
            else:
                for text in troubles:
                    self.problem(record.manifest.key, MANIFEST, f"PostgreSQL's backup manifest {text}")
                self._check_ranges(record, ranges)
        if files is None:
            self.report.warnings.append(f"backup {record.id}: its files were not compared with the manifest, "
                                        "which is missing or damaged")
        with meter(self.progress, f"verify: backup {record.id}", sum(p.size for p in record.parts)) as read:
            outcomes = self.run_all([lambda p=p: check_part_deep(self.storage, p, p.tablespace, files,
                                                                 advance=read.advance)
                                     for p in record.parts])
        if files is None:
            return
        seen: set[str] = set()
        for part, outcome in zip(record.parts, outcomes, strict=True):
            for path in sorted(seen & outcome.seen):
                self.problem(part.key, MANIFEST, f"file {path} is also in an earlier part of the backup")
            seen |= outcome.seen
        weak = sorted({f.algorithm for f in files.values()} - {"SHA256"})
        if weak:
            self.report.warnings.append(f"backup {record.id}: the manifest has {', '.join(weak)} checksums; those "
                                        "files were compared by size only")
        lost = sorted(path for path in files if path not in seen)
        if any(not o.usable for o in outcomes):
            if lost:
                self.problem(record.manifest.key, MANIFEST, f"{len(lost)} file(s) of the manifest are in no "
                             "readable part (see the damaged parts)")
            return
        for path in lost:
            self.problem(record.manifest.key, MANIFEST, f"file {path} is listed in the manifest but is in no part "
                         "of the backup")

    def _check_ranges(self, record: BackupRecord, ranges: list[Any]) -> None:
        try:
            start = Lsn.parse(str(ranges[0]["Start-LSN"]))
            end = Lsn.parse(str(ranges[-1]["End-LSN"]))
            timeline = int(ranges[-1]["Timeline"])
        except (IndexError, KeyError, ValueError, TypeError):
            self.problem(record.manifest.key, MANIFEST, "PostgreSQL's backup manifest has no readable WAL-Ranges")
            return
        if end != record.stop or timeline != record.timeline or start != record.start:
            self.problem(record.manifest.key, MANIFEST, f"the manifest's WAL range {start}..{end} on timeline "
                         f"{timeline} contradicts the sentinel ({record.start_lsn}..{record.stop_lsn} on timeline "
                         f"{record.timeline})")

    # WAL ---------------------------------------------------------------------------------------
    def read_histories(self, wal_objects: Mapping[str, str], names: Mapping[int, str],
                       timelines: set[int]) -> dict[int, list[TimelineSwitch]]:
        """Parse every intact history file; a timeline whose file is bad is followed as if it had none."""
        histories: dict[int, list[TimelineSwitch]] = {}
        for timeline, name in sorted(names.items()):
            key = wal_objects[name]
            try:
                data, _ = read_verified(self.storage, key)
                switches = parse_history(data.decode())
            except (ValueError, UnicodeError):
                self.problem(key, PARSE, f"{name} is not a timeline history file")
                continue
            except PgvaultError:
                continue  # damaged or unreadable: check_wal reports it
            parents = [s.parent for s in switches]
            lsns = [s.switch_lsn for s in switches]
            if any(p >= timeline for p in parents) or parents != sorted(set(parents)) or lsns != sorted(lsns):
                self.problem(key, PARSE, f"{name} lists parent timelines or switch points out of order")
                continue
            histories[timeline] = switches
            timelines.update(parents)
        return histories


def run_verify(
    policy: Policy, storage: Storage, *, backup_id: str | None = None, deep: bool = False,
    progress: Progress = _quiet, now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> VerifyReport:
    """Verify the repository area of policy.cluster (or one backup and the WAL it needs); store the report.

    Problems never raise: they are collected in the report (report.ok is False). Raises only when
    there is nothing to verify: an unknown backup id, or no such cluster in the repository.
    """
    started = now()
    clock = time.monotonic()
    report = VerifyReport(id=_stamp(started), cluster=policy.cluster, repository=policy.repository.url,
                          started=started, deep=deep, backup_id=backup_id)
    v = _Verifier(policy, storage, report, progress)
    stored = _inventory(v, backup_id)

    progress("verify: cluster.json")
    v.check_cluster(stored.cluster_json)
    if v.info is None:
        v.segment_size = _segment_size_of(storage, stored.wal, report)
    scope = [stored.backups[backup_id]] if backup_id is not None else [stored.backups[k] for k in
                                                                        sorted(stored.backups)]
    records, unfinished, debris = _verify_backups(v, scope, deep)
    flow = _verify_wal(v, stored, records, whole=backup_id is None)
    _settle_races(v, records, unfinished)

    layout = v.layout
    for backup in scope:
        if backup.id in debris:
            continue
        own = [p for p in report.problems if p.key.startswith(layout.backup_prefix(backup.id))]
        report.backups.append({
            "id": backup.id, "ok": not own and backup.record is not None and backup.id not in flow.unusable,
            "problems": len(own), "timeline": backup.record.timeline if backup.record else None,
            "parts": len(backup.record.parts) if backup.record else None,
        })
    report.problems.sort(key=lambda p: (p.key, p.kind, p.message))
    report.checked["objects"] = sum(report.checked.get(name, 0) for name in (
        "cluster", "sentinels", "parts", "manifests", "orphans", "wal_segments", "wal_history", "wal_other"))
    report.checked["duration_ms"] = int((time.monotonic() - clock) * 1000)
    report.finished = now()
    _store(storage, layout, report, progress)
    return report


@dataclass
class _Inventory:
    cluster_json: bool
    backups: dict[str, _BackupDir]
    wal: dict[str, str]  # WAL file name -> key


def _inventory(v: _Verifier, backup_id: str | None) -> _Inventory:
    """What is stored, listed once: WAL pushed later is checked next time."""
    layout, storage = v.layout, v.storage
    try:
        # head(), not a listing, which would walk the whole cluster directory; a data file gone beside
        # its sidecar still fails when it is read.
        cluster_json = storage.head(layout.cluster_json) is not None
    except PgvaultError:
        cluster_json = True  # its metadata is unreadable: reading it reports that
    backups: dict[str, _BackupDir] = {}
    for obj in storage.list(layout.backups_prefix):
        name, _, tail = obj.key[len(layout.backups_prefix):].partition("/")
        if tail:
            backups.setdefault(name, _BackupDir(name, set())).keys.add(obj.key)
    wal = {Layout.wal_name(obj.key): obj.key for obj in storage.list(layout.wal_prefix)}
    if not cluster_json and not backups and not wal:
        raise RepositoryError(f"cluster {v.cluster!r} is not in this repository ({v.report.repository})",
                              hint="check cluster and repository.url in the policy; pgvault init creates it")
    if backup_id is not None and backup_id not in backups:
        raise RepositoryError(f"no backup {backup_id!r} in this repository", hint="pgvault list shows backup ids")
    return _Inventory(cluster_json, backups, wal)


def _verify_backups(v: _Verifier, scope: Sequence[_BackupDir],
                    deep: bool) -> tuple[list[BackupRecord], list[_BackupDir], set[str]]:
    """Sentinels first (they say what to expect), then every part and manifest.

    Returns the valid records (by stop LSN, as the catalog orders them), the backups with a manifest
    but no sentinel (decided at the end), and the ids of debris."""
    layout, report = v.layout, v.report
    unfinished: list[_BackupDir] = []
    debris: set[str] = set()
    jobs: list[Callable[[], _Outcome]] = []
    for backup in scope:
        if layout.sentinel_key(backup.id) in backup.keys:
            v.read_sentinel(backup)
            jobs.extend(v.backup_jobs(backup, deep))
        elif layout.manifest_key(backup.id) in backup.keys:
            unfinished.append(backup)  # its sentinel may be being written right now
        else:
            debris.add(backup.id)
            report.warnings.append(f"backup {backup.id}: no sentinel and no manifest: the debris of an unfinished "
                                   "backup, which the next backup removes")
    v.progress(f"verify: {len(scope)} backup(s)" + (", every file against its manifest" if deep else ""))
    v.run_all(jobs)
    records = sorted((b.record for b in scope if b.record is not None), key=lambda r: (r.stop.value, r.stop_time))
    if deep:
        for record in records:
            v.deep_backup(record)
    report.checked["backups"] = len(records)
    return records, unfinished, debris


def _verify_wal(v: _Verifier, stored: _Inventory, records: Sequence[BackupRecord],
                whole: bool) -> Continuity:
    """Every WAL object in scope in full, each timeline's history, then continuity and windows.

    whole: every WAL object; else only what recovery from `records` could replay."""
    layout, report, seg = v.layout, v.report, v.segment_size
    present: dict[int, set[int]] = {}
    history_names: dict[int, str] = {}
    for name, key in stored.wal.items():
        if is_segment(name):
            segment = WalSegment.parse(name, seg)
            present.setdefault(segment.timeline, set()).add(segment.number)
        elif is_history(name):
            history_names[int(name[:8], 16)] = name
        elif not (is_partial(name) or is_backup_history(name)):
            report.warnings.append(f"{key}: not a WAL file name; ignored")
    timelines = set(present) | set(history_names) | {r.timeline for r in records}
    histories = v.read_histories(stored.wal, history_names, timelines)
    if whole:
        scope = [name for name in sorted(stored.wal) if is_segment(name) or is_history(name)
                 or is_partial(name) or is_backup_history(name)]
    else:
        needed: set[WalSegment] = set()
        for record in records:
            needed |= segments_needed(record, histories, present, timelines, seg)
        descendants = {t for t in timelines for r in records if backup_on_path(r, ancestry(t, histories.get(t, [])))}
        scope = sorted(s.name for s in needed) + sorted(history_names[t] for t in descendants if t in history_names)
    v.progress(f"verify: {len(scope)} WAL object(s)")
    system_id = v.info.system_id if v.info else None
    outcomes = v.run_all([lambda name=name: check_wal(v.storage, stored.wal[name], name, system_id=system_id,
                                                      segment_size=seg) for name in scope])
    usable = {t: set(numbers) for t, numbers in present.items()}
    for name, outcome in zip(scope, outcomes, strict=True):
        if outcome.vanished:
            # Expired while verify ran, most likely; if anything still needed it, that is a gap below.
            report.warnings.append(f"{stored.wal[name]}: removed while verify ran")
        if is_segment(name) and not outcome.usable:
            segment = WalSegment.parse(name, seg)
            usable[segment.timeline].discard(segment.number)
            if outcome.vanished:
                present[segment.timeline].discard(segment.number)

    # Every timeline after the first needs its history file, or recovery cannot follow it.
    for timeline in sorted(timelines):
        if timeline > 1 and timeline not in history_names and (whole or any(r.timeline == timeline
                                                                            for r in records)):
            v.problem(layout.wal_key(f"{timeline:08X}.history"), TIMELINE,
                      f"timeline {timeline} has WAL or backups but no history file: recovery cannot follow it")

    v.progress("verify: WAL continuity")
    flow = continuity(records, histories, present, usable, timelines, seg)
    report.gaps = flow.gaps
    report.windows = flow.windows
    for gap in flow.gaps:
        span = gap.first.name if gap.segments == 1 else f"{gap.first.name}..{gap.last.name}"
        tls = ", ".join(str(t) for t in gap.timelines)
        v.problem(layout.wal_key(gap.first.name), GAP, f"WAL gap: {span} ({gap.segments} segment(s)) missing; "
                  f"recovery on timeline {tls} cannot pass {gap.first.start_lsn}")
    for record in records:
        if record.id in flow.unusable:
            v.problem(layout.sentinel_key(record.id), UNUSABLE, f"backup {record.id} cannot become consistent: WAL "
                      f"{flow.unusable[record.id].name}, which it needs, is missing or damaged")
    return flow


def _settle_races(v: _Verifier, records: Sequence[BackupRecord], unfinished: Sequence[_BackupDir]) -> None:
    """Backups that changed while verify ran are warnings, not problems: one finishing (its sentinel
    came), one being expired (expire deletes sentinels first, then parts). Anything else is damage."""
    layout, report = v.layout, v.report
    for backup in unfinished:
        now_stored = {obj.key for obj in v.storage.list(layout.backup_prefix(backup.id))}
        if layout.sentinel_key(backup.id) in now_stored:
            report.warnings.append(f"backup {backup.id} completed while verify ran; it is checked next time")
        elif not backup.keys <= now_stored:
            report.warnings.append(f"backup {backup.id} was removed while verify ran")
        else:
            v.problem(layout.sentinel_key(backup.id), MISSING, f"backup {backup.id} has its parts and manifest but "
                      "no sentinel backup.json: it is invisible and cannot be restored")
    for record in records:
        prefix = layout.backup_prefix(record.id)
        if any(p.kind == MISSING and p.key.startswith(prefix) for p in report.problems) and not v.listed(
                layout.sentinel_key(record.id)):
            report.problems = [p for p in report.problems if not p.key.startswith(prefix)]
            report.warnings.append(f"backup {record.id} was removed while verify ran")


def _segment_size_of(storage: Storage, wal_objects: Mapping[str, str], report: VerifyReport) -> int:
    """Without cluster.json: the raw size wal-push recorded for a segment (sizes differ per cluster)."""
    for name, key in sorted(wal_objects.items()):
        if is_segment(name):
            with contextlib.suppress(PgvaultError):
                meta = storage.head(key)
                raw = meta.extra.get("raw_size", "") if meta is not None else ""
                if raw.isdigit() and int(raw) > 0 and int(raw) & (int(raw) - 1) == 0:
                    report.warnings.append(f"WAL segment size {int(raw)} taken from {key}'s metadata")
                    return int(raw)
            break
    report.warnings.append(f"WAL segment size unknown; assumed {DEFAULT_SEGMENT_SIZE}")
    return DEFAULT_SEGMENT_SIZE


# ---- the stored report -----------------------------------------------------------------------------

def _store(storage: Storage, layout: Layout, report: VerifyReport, progress: Progress) -> None:
    base = report.id
    for attempt in range(1, 100):
        report.id = base if attempt == 1 else f"{base}-{attempt}"
        key = layout.verify_report_key(report.id)
        report.report_key = key
        payload = json.dumps(report.as_dict(), indent=2).encode()
        try:
            storage.put(key, io.BytesIO(payload))
            progress(f"verify: report stored as {key}")
            return
        except ObjectExists:
            continue  # two verifies in one second
        except PgvaultError as exc:
            report.report_key = None
            report.warnings.append(f"the report could not be stored in the repository: {exc.message}")
            return
    report.id = base
    report.report_key = None
    report.warnings.append("the report could not be stored: too many reports with this time stamp")


def latest_verify_report(storage: Storage, cluster: str) -> dict[str, Any] | None:
    """The newest stored verify report of cluster (by its UTC id), or None if verify never ran.

    Raises IntegrityError if that report is damaged, RepositoryError if it cannot be read.
    """
    layout = Layout(cluster)
    newest: tuple[tuple[str, int], str] | None = None
    for obj in storage.list(layout.verify_prefix):
        name = obj.key[len(layout.verify_prefix):]
        if "/" in name or not name.endswith(".json"):
            continue
        order = _report_order(name.removesuffix(".json"))
        if order is not None and (newest is None or order > newest[0]):
            newest = (order, obj.key)
    if newest is None:
        return None
    data, _meta = read_verified(storage, newest[1])
    try:
        loaded = json.loads(data)
    except ValueError:
        raise IntegrityError(f"verify report {newest[1]} is not valid JSON") from None
    if not isinstance(loaded, dict):
        raise IntegrityError(f"verify report {newest[1]} is not a report")
    return loaded
