"""The policy file: pydantic models, YAML loading, and one-line errors for every mistake in it."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from pgvault.errors import ConfigError

CONFIG_ENV = "PGVAULT_CONFIG"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3, "tb": 1000**4, "tib": 1024**4,
}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: Any) -> int:
    """'256MiB' -> 268435456; plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 256MiB")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 256MiB or 1GiB")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]


def parse_duration(value: Any) -> timedelta:
    """'7d' -> 7 days; units s, m, h, d, w."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 15m, 12h, 7d or 2w")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2).lower()])


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `retension:` must not silently fall back to defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresConfig(_Section):
    conninfo: str = Field(description="libpq connection string; PG* environment variables also apply")
    # When conninfo names a streaming standby: its primary. A standby archives nothing, so the last
    # segment a standby backup needs reaches the repository only when the primary switches WAL;
    # with this set pgvault switches it there (as pgBackRest's backup-standby does). Like conninfo
    # it may hold a password: it goes to libpq only, and errors about it pass through redact().
    primary_conninfo: str | None = Field(
        default=None, description="libpq connection string of the primary when conninfo names a standby")
    pgdata: Path | None = None
    bindir: Path | None = Field(default=None, description="where initdb, pg_ctl and pg_waldump live")


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Config(_Section):
    """How to reach an S3 bucket. Unset values come from boto3's standard configuration."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    ca_bundle: Path | None = None
    storage_class: Literal["STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
                           "REDUCED_REDUNDANCY"] | None = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    sse_kms_key_id: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # If-None-Match on PUT makes no-overwrite atomic; endpoints that ignore it need `false`
    # (then pgvault checks before it writes, which two racing writers can both pass).
    conditional_writes: bool = True
    multipart_chunk_size: Size = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    connect_timeout: Duration = timedelta(seconds=5)
    read_timeout: Duration = timedelta(seconds=60)
    # Each request is retried (backoff with jitter) on 5xx, throttling, timeouts and resets, up to
    # `retries` more tries and never starting a try later than `retry_window` after the first.
    retries: StrictInt = Field(default=6, ge=0, le=50)
    retry_window: Duration = timedelta(seconds=60)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        if url is not None and (urlparse(url).scheme not in ("http", "https") or not urlparse(url).hostname):
            raise ValueError(f"{url!r} is not an http(s) URL; write e.g. https://minio.example.net:9000")
        return url

    @field_validator("region")
    @classmethod
    def _region(cls, region: str | None) -> str | None:
        if region is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", region):
            raise ValueError(f"{region!r} is not a region name; write e.g. eu-central-1 (MinIO: us-east-1)")
        return region

    @field_validator("ca_bundle")
    @classmethod
    def _bundle_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} does not exist or is not a file; give the PEM file of the CA that signed "
                             "the endpoint's certificate")
        return path

    @field_validator("connect_timeout", "read_timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1:
            raise ValueError("must be at least 1s")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> S3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither (then boto3's standard "
                             "credentials apply)")
        if self.sse_kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs sse: aws:kms")
        return self


class RepositoryConfig(_Section):
    url: str
    s3: S3Config | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                # file://var/lib/pgvault would otherwise quietly mean the directory /lib/pgvault.
                raise ValueError(f"{url!r} names a host ({parsed.netloc}); a file repository needs three "
                                 "slashes, e.g. file:///var/lib/pgvault")
            if not parsed.path.startswith("/"):
                raise ValueError("a file repository needs an absolute path, e.g. file:///var/lib/pgvault")
            return url
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"{url!r} names no bucket; write s3://bucket/prefix")
            if not _BUCKET_RE.match(parsed.netloc) or ".." in parsed.netloc:
                raise ValueError(f"{parsed.netloc!r} is not a valid bucket name (3-63 lowercase letters, digits, "
                                 "'.' or '-'); write s3://bucket/prefix")
            if parsed.query or parsed.fragment or "//" in parsed.path:
                raise ValueError(f"{url!r} is not of the form s3://bucket/prefix")
            return url
        raise ValueError(f"unsupported scheme {parsed.scheme or '(none)'!r}; use file:///absolute/path or "
                         "s3://bucket/prefix")

    @model_validator(mode="after")
    def _s3_section_matches(self) -> RepositoryConfig:
        if self.s3 is not None and self.kind != "s3":
            raise ValueError("the s3 section applies only to s3:// urls; remove it or change url")
        return self

    @property
    def kind(self) -> Literal["file", "s3"]:
        return "s3" if self.url.startswith("s3:") else "file"

    @property
    def path(self) -> Path:
        return Path(urlparse(self.url).path)

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        """The key prefix inside the bucket, without slashes at either end ('' for the bucket's root)."""
        return urlparse(self.url).path.strip("/")


class CompressionConfig(_Section):
    type: Literal["zstd"] = "zstd"
    level: StrictInt = Field(default=3, ge=1, le=19)
    # zstd worker threads for backup parts; 0 means one per core, at most 4 (more threads rarely beat the
    # speed PostgreSQL streams the backup at). With pgvault's 2 MiB jobs a worker costs a few MiB.
    threads: StrictInt = Field(default=0, ge=0, le=64)


class BackupConfig(_Section):
    part_size: Size = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Fast checkpoint: a spread checkpoint made one backup wait 210 s for nothing.
    checkpoint: Literal["fast", "spread"] = "fast"
    # How long to wait for the WAL a backup needs to reach the repository before failing it.
    wal_timeout: Duration = timedelta(minutes=5)
    # Parts uploaded at once. The part being read is one of them, so 2 lets the upload of one part
    # overlap the reading of the next. They share a fixed 16 MiB buffer (beyond it, a temp file); on S3
    # each also holds a multipart chunk or two in memory.
    upload_parallel: StrictInt = Field(default=2, ge=1, le=64)


class ArchiveConfig(_Section):
    check_timeout: Duration = timedelta(seconds=60)
    compression_level: StrictInt = Field(default=1, ge=1, le=19)
    # wal-push look-ahead: how many other `.ready` segments one archive_command call may push too
    # (0 = off). PostgreSQL's later call for one of them then only compares a checksum.
    look_ahead: StrictInt = Field(default=8, ge=0, le=64)
    # Threads pushing the look-ahead's segments; each holds one segment and its compressed copy, so
    # fewer are used when more than 64 MiB of segments would be in flight (segments above 16 MiB).
    push_parallel: StrictInt = Field(default=4, ge=1, le=16)
    # The look-ahead in a background process (pgvault.pusher, like pgBackRest's archive-async): a call
    # without a marker pushes its own segment, starts the pusher if none runs, and returns; the pusher
    # keeps up to look_ahead segments marked ahead of PostgreSQL's calls.
    background: bool = False


class RestoreConfig(_Section):
    parallel: StrictInt = Field(default=2, ge=1, le=64)
    # wal-fetch prefetch (restore_command): how many segments after the one PostgreSQL asks for a
    # background worker fetches into a spool outside PGDATA (0 = off), how many at once, and how many
    # bytes the spool may hold. Each restore_command call otherwise pays for its own process start,
    # policy load, storage client and round trip; from the spool a call takes tens of milliseconds.
    prefetch: StrictInt = Field(default=8, ge=0, le=256)
    prefetch_parallel: StrictInt = Field(default=4, ge=1, le=32)
    prefetch_max_bytes: Size = Field(default=1024**3, ge=0)


class RetentionConfig(_Section):
    daily: StrictInt = Field(default=7, ge=0)
    weekly: StrictInt = Field(default=4, ge=0)
    monthly: StrictInt = Field(default=6, ge=0)
    min_backups: StrictInt = Field(default=1, ge=1)
    pitr_window: Duration = timedelta(days=7)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return name


CRON_OFF = "off"


def _cron(expression: Any) -> str:
    from croniter import croniter

    if isinstance(expression, str) and expression.strip().lower() == CRON_OFF:
        return CRON_OFF  # this node does not run the job (e.g. drills on one node of a cluster only)
    if not isinstance(expression, str) or not croniter.is_valid(expression):
        raise ValueError(f"{expression!r} is not a cron expression; write five fields, e.g. '0 2 * * *' "
                         "(02:00 every day), or off")
    return expression


Cron = Annotated[str, BeforeValidator(_cron)]


class ScheduleConfig(_Section):
    backup: Cron = "0 2 * * *"
    verify: Cron = "30 3 * * *"
    drill: Cron = "0 4 1 */3 *"
    timezone: str = "UTC"  # the zone the cron expressions are read in
    retries: StrictInt = Field(default=2, ge=0, le=20)  # a failed job runs again this many times
    retry_delay: Duration = timedelta(minutes=5)
    # With Patroni: only the node this picks takes backups (the others skip), decided from the
    # REST API of the members listed here; "replica" means a healthy streaming replica if there
    # is one, else the leader.
    patroni_urls: list[str] = Field(default_factory=list)
    backup_from: Literal["leader", "replica"] = "replica"
    # Patroni's lag is the leader's last LSN minus the replica's, each written to the DCS once per
    # loop_wait, so an idle replica shows a whole segment of lag for up to loop_wait after every
    # WAL switch (archive_timeout). 64 MiB passes over replicas that are really behind, not those.
    max_replica_lag: Size = 64 * 1024 * 1024
    # This node's Patroni member name (default: the host name).
    member: str | None = None
    metrics_listen: str = "127.0.0.1:9188"  # where `schedule run` serves Prometheus metrics; "" = off

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        return RetentionConfig._known_zone(name)

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            from pgvault.metrics import parse_listen

            parse_listen(value)
        return value

    @field_validator("patroni_urls")
    @classmethod
    def _rest_api_urls(cls, urls: list[str]) -> list[str]:
        # Caught here, not at 02:00: a URL without scheme would only fail when the first backup is due.
        for url in urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                shown = re.sub(r"(?<=://)[^/@\s]+@", "", url)  # no user:password in the message
                raise ValueError(f"{shown!r} is not the URL of a Patroni REST API; write e.g. http://10.0.0.1:8008")
        return urls


class AlertsConfig(_Section):
    """Webhooks called on failure and on recovery; unset, SLACK_WEBHOOK_URL / ALERT_WEBHOOK_URL apply."""

    slack_webhook_url: SecretStr | None = None
    webhook_url: SecretStr | None = None
    timeout: Duration = timedelta(seconds=10)
    retries: StrictInt = Field(default=3, ge=0, le=10)

    @field_validator("slack_webhook_url", "webhook_url")
    @classmethod
    def _http_url(cls, url: SecretStr | None) -> SecretStr | None:
        # Caught when the policy loads, not at the first failure; the message never repeats the URL.
        if url is not None:
            parsed = urlparse(url.get_secret_value())
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError("must be an http(s) URL such as https://hooks.slack.com/services/...")
        return url

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1:
            raise ValueError("must be at least 1s")
        return value


class DrillCheck(_Section):
    name: str
    database: str = "postgres"
    query: str
    expect: str  # the first column of the first row, as text


class DrillConfig(_Section):
    checks: list[DrillCheck] = Field(default_factory=list)
    amcheck: bool = True  # pg_amcheck over every database of the restored copy
    timeout: Duration = timedelta(minutes=30)  # restore + recovery + checks
    # Where the scratch copy goes (a directory per drill, removed afterwards); it needs room for the
    # whole restored cluster, which /tmp (often a small tmpfs) may not have. Default: $TMPDIR or /tmp.
    # Not checked when the policy loads: wal-push on hosts that never drill must not fail over it.
    scratch_dir: Path | None = None

    @field_validator("scratch_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"{str(path)!r} is not an absolute path; write e.g. /srv/pgvault-drills")
        return path


class Policy(_Section):
    cluster: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    postgres: PostgresConfig
    repository: RepositoryConfig
    compression: CompressionConfig = CompressionConfig()
    backup: BackupConfig = BackupConfig()
    archive: ArchiveConfig = ArchiveConfig()
    restore: RestoreConfig = RestoreConfig()
    retention: RetentionConfig = RetentionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    alerts: AlertsConfig = AlertsConfig()
    drill: DrillConfig = DrillConfig()



# pydantic's own wording ("Input should be a valid dictionary or instance of PostgresConfig") names
# neither the YAML shape nor the fix; these say what to write instead.
_TYPE_RULES = {
    "string_type": "must be text (quote it)",
    "model_type": "must be a section: its settings as 'key: value' lines indented under it",
    "dict_type": "must be a section: its settings as 'key: value' lines indented under it",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "path_type": "must be a file system path (quote it)",
    "literal_error": "must be {expected}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be more than {gt}",
    "less_than": "must be less than {lt}",
}


_SECRET_WORDS = ("secret", "token", "password", "access_key", "webhook")


def _describe(error: dict[str, Any], source: str) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        return f"{source}: {where} is required; add it"
    if kind == "extra_forbidden":
        return f"{source}: unknown key {where}; remove it or check its spelling"
    if kind in _TYPE_RULES:
        rule = _TYPE_RULES[kind].format(**(error.get("ctx") or {}))
        value = error.get("input")
        if any(word in where for word in _SECRET_WORDS):
            return f"{source}: {where} {rule}"  # never echo what may be a secret (guarantee 10)
        given = "an empty value" if value is None else repr(value) if len(repr(value)) <= 60 else "that value"
        return f"{source}: {where} {rule}, not {given}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "string_pattern_mismatch" and where == "cluster":
        message = "must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
    return f"{source}: {where}: {message}"


def parse_policy(data: Any, source: str) -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level; write 'key: value' lines "
                          "starting with cluster:, postgres: and repository:")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0], source)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None


def resolve_config_path(explicit: str | None) -> Path:
    value = explicit or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError(
            "no policy file given", hint=f"pass --config FILE or set {CONFIG_ENV} (see policies/ for examples)"
        )
    return Path(value).absolute()


def load_policy(path: Path) -> Policy:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"policy file {path} does not exist", hint="check --config / PGVAULT_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}",
                          hint="make it a readable file for the user running pgvault "
                          "(PostgreSQL runs wal-push as its own OS user)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    return parse_policy(data, str(path))
