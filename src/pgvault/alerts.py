"""Alerts: a webhook call when a job fails, and again when it works after failing.

Two receivers, each optional: a Slack incoming webhook (`alerts.slack_webhook_url`, else
$SLACK_WEBHOOK_URL) gets `{"text": ..., "blocks": [...]}`; a generic webhook
(`alerts.webhook_url`, else $ALERT_WEBHOOK_URL) gets the JSON body of `generic_payload`.
Each call is retried with backoff and bounded by `alerts.timeout` per try.

Delivery never raises: an alert that cannot be sent must not turn a finished backup into a
crashed scheduler. Failures are logged and returned as lines the caller may show.

Nothing secret leaves (guarantee 10): the message and details are scrubbed of conninfo passwords,
the webhook URLs themselves, S3 credentials (from the policy and the AWS environment) and
anything that looks like them, before a payload is built.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pgvault import __version__
from pgvault.redaction import redact

if TYPE_CHECKING:
    from pgvault.config import Policy

log = logging.getLogger("pgvault.alerts")

SLACK_ENV = "SLACK_WEBHOOK_URL"
WEBHOOK_ENV = "ALERT_WEBHOOK_URL"
# Environment variables whose values are secrets wherever they turn up in a message.
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD", SLACK_ENV,
               WEBHOOK_ENV)
# A details key containing one of these has its value withheld, whatever the value looks like.
_SECRET_KEYS = ("password", "secret", "token", "access_key", "webhook", "credential", "conninfo", "dsn")
MASK = "***"

# Backoff between tries: 0.5 s, 1 s, 2 s, ... at most 8 s; a 429's Retry-After is honoured up to 30 s.
BACKOFF = 0.5
_MAX_PAUSE = 8.0
_MAX_RETRY_AFTER = 30.0
# Slack refuses a section text over 3000 characters and a field over 2000; at most 10 fields.
_SLACK_TEXT_MAX = 2900
_SLACK_FIELD_MAX = 1900
_SLACK_FIELDS_MAX = 10
_URL_USERINFO = re.compile(r"(https?://)[^/@\s]+@", re.IGNORECASE)
_SLACK_HOOK = re.compile(r"https://hooks\.slack(?:-gov)?\.com/\S+", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET_ASSIGNMENT = re.compile(r"((?:aws_)?secret_access_key|session_token)(\s*[=:]\s*)\S+", re.IGNORECASE)

Status = Literal["failed", "recovered"]


@dataclass(frozen=True)
class AlertEvent:
    """What happened: job `job` of `cluster` failed, or works again after failing."""

    cluster: str
    job: str  # backup, verify, drill, expire, ...
    status: Status
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    host: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        if self.status not in ("failed", "recovered"):
            raise ValueError(f"status must be 'failed' or 'recovered', not {self.status!r}")


@dataclass(frozen=True)
class Receiver:
    kind: Literal["slack", "webhook"]
    url: str

    @property
    def name(self) -> str:
        """How errors name this receiver: its kind and host, never the path or query (they hold the token)."""
        host = urlparse(self.url).hostname
        return f"{self.kind} webhook ({host})" if host else f"{self.kind} webhook"


def receivers(policy: Policy, environ: Mapping[str, str] | None = None) -> list[Receiver]:
    """The webhooks to call: the policy's, else the environment's."""
    env = os.environ if environ is None else environ
    found: list[Receiver] = []
    slack = policy.alerts.slack_webhook_url.get_secret_value() if policy.alerts.slack_webhook_url else None
    generic = policy.alerts.webhook_url.get_secret_value() if policy.alerts.webhook_url else None
    slack = slack or env.get(SLACK_ENV, "").strip()
    generic = generic or env.get(WEBHOOK_ENV, "").strip()
    if slack:
        found.append(Receiver("slack", slack))
    if generic:
        found.append(Receiver("webhook", generic))
    return found


# Scrubbing ------------------------------------------------------------------------------------


def known_secrets(policy: Policy, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret value pgvault knows of for this policy, longest first (so none is half-replaced)."""
    env = os.environ if environ is None else environ
    values: set[str] = {r.url for r in receivers(policy, env)}
    values.update(env.get(name, "") for name in _SECRET_ENV)
    s3 = policy.repository.s3
    if s3 is not None:
        values.add(s3.access_key_id or "")
        for secret in (s3.secret_access_key, s3.session_token):
            if secret is not None:
                values.add(secret.get_secret_value())
    for conninfo in (policy.postgres.conninfo, policy.postgres.primary_conninfo):
        password = _conninfo_password(conninfo) if conninfo else None
        if password:
            values.add(password)
    return sorted((v for v in values if v), key=len, reverse=True)


def _conninfo_password(conninfo: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        value = conninfo_to_dict(conninfo).get("password")
    except Exception:  # an unparsable conninfo: redact()'s patterns still apply
        return None
    return str(value) if value else None


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    """text without any known secret, conninfo password, URL credentials, Slack hook or AWS key."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = redact(text)
    text = _SLACK_HOOK.sub(f"https://hooks.slack.com/{MASK}", text)
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _AWS_SECRET_ASSIGNMENT.sub(rf"\1\2{MASK}", text)


def scrub(value: Any, secrets: list[str], key: str = "") -> Any:
    """A JSON-ready copy of value: secret-named keys withheld, every string scrubbed."""
    if key and any(word in key.lower() for word in _SECRET_KEYS):
        return MASK
    if isinstance(value, Mapping):
        return {str(k): scrub(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, secrets) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return scrub_text(str(value), secrets)


# Payloads -------------------------------------------------------------------------------------


def generic_payload(event: AlertEvent, secrets: list[str]) -> dict[str, Any]:
    """The generic webhook's JSON body (documented in the README; keep it stable)."""
    return {
        "source": "pgvault",
        "version": __version__,
        "cluster": event.cluster,
        "job": event.job,
        "status": event.status,
        "message": scrub_text(event.message, secrets),
        "time": event.time.astimezone(UTC).isoformat(),
        "host": event.host,
        "details": scrub(dict(event.details), secrets),
    }


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads &, < and > as markup (links, mentions); escape them as Slack documents.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_payload(event: AlertEvent, secrets: list[str]) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` (notifications, old clients) plus blocks."""
    body = generic_payload(event, secrets)
    icon = ":red_circle:" if event.status == "failed" else ":large_green_circle:"
    verb = "FAILED" if event.status == "failed" else "recovered"
    headline = f"pgvault {event.job} {verb} for cluster {event.cluster} on {event.host}"
    message = _clip(_slack_escape(body["message"]), _SLACK_TEXT_MAX - len(headline) - 20)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": f"{icon} *{_slack_escape(headline)}*\n{message}"}},
    ]
    fields = [{"type": "mrkdwn", "text": _clip(f"*{_slack_escape(k)}*\n{_slack_escape(_flat(v))}", _SLACK_FIELD_MAX)}
              for k, v in list(body["details"].items())[:_SLACK_FIELDS_MAX]]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                    "text": f"{body['time']} · host {_slack_escape(event.host)}"}]})
    return {"text": _clip(f"{icon} {headline}: {body['message']}", _SLACK_TEXT_MAX), "blocks": blocks}


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# Delivery -------------------------------------------------------------------------------------


class _Retry(Exception):
    """A try failed in a way another try may fix."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class _GiveUp(Exception):
    """A try failed in a way no retry fixes (a 4xx, a malformed URL)."""


def _post_once(url: str, body: bytes, timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"pgvault/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code in (408, 429) or exc.code >= 500:
                wait = _retry_after(exc.headers.get("Retry-After")) if exc.code == 429 else None
                raise _Retry(f"HTTP {exc.code}", wait) from None
            raise _GiveUp(f"HTTP {exc.code} (not retried: the receiver refused the request)") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError | socket.timeout):
            raise _Retry(f"timed out after {timeout:g} s") from None
        raise _Retry(getattr(reason, "strerror", None) or str(reason)) from None
    except TimeoutError:  # a read timeout after the connection was made
        raise _Retry(f"timed out after {timeout:g} s") from None
    except (ConnectionError, OSError) as exc:
        raise _Retry(exc.strerror or type(exc).__name__) from None


def _retry_after(header: str | None) -> float | None:
    try:
        return min(float(header), _MAX_RETRY_AFTER) if header else None
    except ValueError:
        return None


def deliver(receiver: Receiver, payload: dict[str, Any], *, timeout: float, retries: int,
            backoff: float = BACKOFF, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """POST payload to receiver; None when it was accepted, else one line saying why not."""
    if urlparse(receiver.url).scheme not in ("http", "https") or not urlparse(receiver.url).hostname:
        setting = ("alerts.slack_webhook_url or " + SLACK_ENV if receiver.kind == "slack"
                   else "alerts.webhook_url or " + WEBHOOK_ENV)
        return f"{receiver.kind} webhook: the URL is not an http(s) URL; set {setting} to the receiver's https:// URL"
    body = json.dumps(payload).encode()
    tries = retries + 1
    for attempt in range(1, tries + 1):
        try:
            _post_once(receiver.url, body, timeout)
            return None
        except _GiveUp as exc:
            return f"{receiver.name}: {exc}"
        except _Retry as exc:
            if attempt == tries:
                return f"{receiver.name}: {exc.reason} (gave up after {tries} tr{'y' if tries == 1 else 'ies'})"
            pause = exc.wait if exc.wait is not None else min(_MAX_PAUSE, backoff * 2 ** (attempt - 1))
            log.info("%s: %s; retrying in %.1f s", receiver.name, exc.reason, pause)
            sleep(pause)
    return None  # not reached: the loop returns on its last try


def notify(policy: Policy, event: AlertEvent, *, backoff: float = BACKOFF,
           environ: Mapping[str, str] | None = None) -> list[str]:
    """Send event to every configured webhook, in parallel. Returns delivery errors; never raises."""
    try:
        targets = receivers(policy, environ)
        if not targets:
            return []
        secrets = known_secrets(policy, environ)
        payloads = {"slack": slack_payload(event, secrets), "webhook": generic_payload(event, secrets)}
        timeout = max(policy.alerts.timeout.total_seconds(), 0.1)
        results: dict[int, str | None] = {}

        def send(index: int, receiver: Receiver) -> None:
            try:
                results[index] = deliver(receiver, payloads[receiver.kind], timeout=timeout,
                                         retries=policy.alerts.retries, backoff=backoff)
            except Exception as exc:  # a bug in delivery must still not reach the caller
                results[index] = f"{receiver.name}: unexpected {type(exc).__name__}"

        # One thread per receiver: a hanging Slack must not delay the generic webhook, or the reverse.
        threads = [threading.Thread(target=send, args=(i, r), name=f"pgvault-alert-{r.kind}", daemon=True)
                   for i, r in enumerate(targets)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [scrub_text(results.get(i) or "", secrets) for i in range(len(targets)) if results.get(i)]
    except Exception as exc:
        errors = [f"alerts: unexpected {type(exc).__name__}; no alert was sent"]
    for error in errors:
        log.warning("alert for %s of %s not delivered: %s", event.job, event.cluster, error)
    return errors
