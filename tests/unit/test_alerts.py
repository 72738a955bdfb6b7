"""Alerts reach real HTTP receivers (http.server on 127.0.0.1), retry, time out, and never carry secrets.

Also: the shipped Prometheus alert rules are well-formed and use the metrics pgvault exports.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgvault.alerts import AlertEvent, notify, receivers, scrub_text
from pgvault.config import Policy, parse_policy
from pgvault.errors import ConfigError
from pgvault.metrics import METRICS

CONNINFO_PASSWORD = "hunter2-very-secret"
S3_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
S3_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ENV_SECRET = "env-aws-secret-from-the-environment"
SLACK_PATH = "/services/T0001/B0002/slack-token-xyz"
WEBHOOK_PATH = "/pgvault/generic-token-abc?key=query-secret"
RULES = Path(__file__).resolve().parents[2] / "compose" / "prometheus" / "alerts.yml"


@dataclass
class Received:
    path: str
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script.

    script entries: an HTTP status to answer, or "hang" (answer nothing until the test ends).
    When the script runs out it answers 200.
    """

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    script: list[int | str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(*script: int | str) -> Receiver:
        holder: dict[str, Receiver] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                me = holder["r"]
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                me.received.append(Received(self.path, raw))
                action = me.script.pop(0) if me.script else 200
                if action == "hang":
                    me.release.wait(30)
                    return
                self.send_response(int(action))
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        receiver = Receiver(server, script=list(script))
        holder["r"] = receiver
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.release.set()
        receiver.server.shutdown()
        receiver.server.server_close()


def policy_for(slack: str | None = None, webhook: str | None = None, **alerts: Any) -> Policy:
    section: dict[str, Any] = {"timeout": "2s", "retries": 2, **alerts}
    if slack:
        section["slack_webhook_url"] = slack
    if webhook:
        section["webhook_url"] = webhook
    return parse_policy({
        "cluster": "main",
        "postgres": {"conninfo": f"host=db.internal user=app password={CONNINFO_PASSWORD} dbname=app"},
        "repository": {"url": "s3://pgvault-backups/prod",
                       "s3": {"access_key_id": S3_KEY_ID, "secret_access_key": S3_SECRET}},
        "alerts": section,
    }, "test-policy.yaml")


def failed(message: str = "backup failed: cannot connect", **details: Any) -> AlertEvent:
    return AlertEvent(cluster="main", job="backup", status="failed", message=message, details=details,
                      time=datetime(2026, 11, 26, 2, 0, 5, tzinfo=UTC), host="db1")


NO_ENV: dict[str, str] = {}


def test_both_webhooks_receive_a_failure(receiver_factory: Any) -> None:
    slack, generic = receiver_factory(), receiver_factory()
    policy = policy_for(slack.url(SLACK_PATH), generic.url(WEBHOOK_PATH))

    errors = notify(policy, failed(backup_id="20261126T020000Z", attempt=3), environ=NO_ENV)

    assert errors == []
    [to_slack] = slack.received
    [to_generic] = generic.received
    assert to_slack.path == SLACK_PATH
    message = to_slack.json
    assert "backup FAILED for cluster main on db1" in message["text"]
    assert "cannot connect" in message["text"]
    assert [b["type"] for b in message["blocks"]] == ["section", "section", "context"]
    assert {f["text"] for f in message["blocks"][1]["fields"]} == {"*backup_id*\n20261126T020000Z",
                                                                   "*attempt*\n3"}
    assert to_generic.json == {
        "source": "pgvault", "version": to_generic.json["version"], "cluster": "main", "job": "backup",
        "status": "failed", "message": "backup failed: cannot connect", "time": "2026-11-26T02:00:05+00:00",
        "host": "db1", "details": {"backup_id": "20261126T020000Z", "attempt": 3},
    }


def test_a_recovery_is_announced_as_recovered(receiver_factory: Any) -> None:
    slack, generic = receiver_factory(), receiver_factory()
    policy = policy_for(slack.url(SLACK_PATH), generic.url(WEBHOOK_PATH))
    event = AlertEvent(cluster="main", job="verify", status="recovered", message="verify passed again",
                       details={})

    assert notify(policy, event, environ=NO_ENV) == []
    assert "verify recovered for cluster main" in slack.received[0].json["text"]
    assert ":large_green_circle:" in slack.received[0].json["text"]
    body = generic.received[0].json
    assert (body["status"], body["job"], body["details"]) == ("recovered", "verify", {})
    assert datetime.fromisoformat(body["time"]).tzinfo is not None
    assert body["host"]


def test_a_500_is_retried_until_the_receiver_accepts(receiver_factory: Any) -> None:
    generic = receiver_factory(500, 503)
    policy = policy_for(webhook=generic.url(WEBHOOK_PATH), retries=2)

    assert notify(policy, failed(), environ=NO_ENV, backoff=0.05) == []
    assert len(generic.received) == 3
    assert generic.received[0].raw == generic.received[2].raw


def test_a_receiver_that_keeps_failing_gives_one_error_after_the_retries(receiver_factory: Any) -> None:
    generic = receiver_factory(500, 500, 500, 500)
    policy = policy_for(webhook=generic.url(WEBHOOK_PATH), retries=1)

    errors = notify(policy, failed(), environ=NO_ENV, backoff=0.05)

    assert len(generic.received) == 2
    assert errors == ["webhook webhook (127.0.0.1): HTTP 500 (gave up after 2 tries)"]


def test_a_4xx_is_not_retried(receiver_factory: Any) -> None:
    generic = receiver_factory(404)
    errors = notify(policy_for(webhook=generic.url(WEBHOOK_PATH), retries=3), failed(), environ=NO_ENV,
                    backoff=0.05)
    assert len(generic.received) == 1
    assert len(errors) == 1 and "HTTP 404" in errors[0] and "not retried" in errors[0]


def test_a_hanging_receiver_times_out_and_does_not_hold_up_the_other(receiver_factory: Any) -> None:
    hanging, fine = receiver_factory("hang", "hang", "hang"), receiver_factory()
    policy = policy_for(hanging.url(SLACK_PATH), fine.url(WEBHOOK_PATH), timeout="1s", retries=1)

    started = time.monotonic()
    errors = notify(policy, failed(), environ=NO_ENV, backoff=0.05)
    took = time.monotonic() - started

    assert errors == ["slack webhook (127.0.0.1): timed out after 1 s (gave up after 2 tries)"]
    assert len(hanging.received) == 2
    assert 2.0 <= took < 6.0  # two tries of 1 s each plus the backoff, not 30 s of hanging
    assert len(fine.received) == 1


def test_an_unreachable_receiver_is_an_error_not_an_exception(receiver_factory: Any) -> None:
    gone = receiver_factory()
    url = gone.url(WEBHOOK_PATH)
    gone.server.shutdown()
    gone.server.server_close()  # nothing listens on that port any more

    errors = notify(policy_for(webhook=url, retries=1), failed(), environ=NO_ENV, backoff=0.05)

    assert len(errors) == 1 and errors[0].startswith("webhook webhook (127.0.0.1): ")
    assert "gave up after 2 tries" in errors[0]


def test_a_url_that_is_not_http_is_refused_without_echoing_it() -> None:
    # In the policy: refused when the policy loads, not at the first failure.
    with pytest.raises(ConfigError) as caught:
        policy_for(slack="hooks.slack.com/services/T1/B2/not-a-url-secret")
    assert "alerts.slack_webhook_url" in caught.value.message and "http(s) URL" in caught.value.message
    assert "not-a-url-secret" not in caught.value.message
    # From the environment: reported by notify, which never raises.
    errors = notify(policy_for(), failed(), environ={"SLACK_WEBHOOK_URL": "hooks.slack.com/T1/B2/env-url-secret"})
    assert len(errors) == 1 and "not an http(s) URL" in errors[0], errors
    assert "env-url-secret" not in errors[0]


def test_webhooks_come_from_the_environment_when_the_policy_sets_none(receiver_factory: Any) -> None:
    slack, generic = receiver_factory(), receiver_factory()
    env = {"SLACK_WEBHOOK_URL": slack.url(SLACK_PATH), "ALERT_WEBHOOK_URL": generic.url(WEBHOOK_PATH)}

    assert [r.kind for r in receivers(policy_for(), env)] == ["slack", "webhook"]
    assert notify(policy_for(), failed(), environ=env) == []
    assert len(slack.received) == 1 and len(generic.received) == 1


def test_the_policy_wins_over_the_environment(receiver_factory: Any) -> None:
    configured, from_env = receiver_factory(), receiver_factory()
    policy = policy_for(webhook=configured.url(WEBHOOK_PATH))

    assert notify(policy, failed(), environ={"ALERT_WEBHOOK_URL": from_env.url("/other")}) == []
    assert len(configured.received) == 1 and from_env.received == []


def test_nothing_configured_sends_nothing_and_says_nothing() -> None:
    assert notify(policy_for(), failed(), environ=NO_ENV) == []


def test_no_secret_reaches_either_webhook(receiver_factory: Any) -> None:
    slack, generic = receiver_factory(), receiver_factory()
    slack_url, generic_url = slack.url(SLACK_PATH), generic.url(WEBHOOK_PATH)
    policy = policy_for(slack_url, generic_url)
    env = {"AWS_SECRET_ACCESS_KEY": ENV_SECRET}
    message = (f"backup failed: connection to server failed (host=db.internal user=app password={CONNINFO_PASSWORD});"
               f" retried with postgresql://app:{CONNINFO_PASSWORD}@db.internal/app; the server said "
               f"'{CONNINFO_PASSWORD}' is wrong; S3 said key {S3_KEY_ID} / {S3_SECRET} / {ENV_SECRET} "
               f"was refused; alert to {slack_url} and https://hooks.slack.com/services/T9/B9/other-hook; "
               f"aws_secret_access_key = something-else-secret")
    event = failed(message,
                   conninfo=f"host=db.internal password={CONNINFO_PASSWORD}",
                   error=f"FATAL: password authentication failed ({CONNINFO_PASSWORD})",
                   endpoint={"url": generic_url, "secret_access_key": "nested-secret"},
                   attempts=[f"postgres://app:{CONNINFO_PASSWORD}@db/app", 2],
                   webhook="whatever-this-is")

    assert notify(policy, event, environ=env) == []

    bodies = [r.raw.decode() for r in (*slack.received, *generic.received)]
    assert len(bodies) == 2
    secrets = [CONNINFO_PASSWORD, S3_KEY_ID, S3_SECRET, ENV_SECRET, "slack-token-xyz", "generic-token-abc",
               "query-secret", "other-hook", "something-else-secret", "nested-secret", "whatever-this-is"]
    for body in bodies:
        for secret in secrets:
            assert secret not in body
    # What is not secret still tells the story.
    generic_body = generic.received[0].json
    assert "connection to server failed" in generic_body["message"]
    assert "host=db.internal" in generic_body["message"]
    assert generic_body["details"]["attempts"][1] == 2
    assert generic_body["details"]["conninfo"] == "***"


@pytest.mark.parametrize(("text", "clean"), [
    ("password=abc host=x", "password=*** host=x"),
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
    ("https://user:pw@alerts.example.com/x", "https://***@alerts.example.com/x"),
    ("see https://hooks.slack.com/services/T/B/tok please", "see https://hooks.slack.com/*** please"),
    ("key AKIAABCDEFGHIJKLMNOP here", "key *** here"),
])
def test_scrubbing_removes_secrets_it_was_not_told_about(text: str, clean: str) -> None:
    assert scrub_text(text, []) == clean


def test_a_failing_delivery_never_raises_even_with_odd_details(receiver_factory: Any) -> None:
    generic = receiver_factory()

    class Odd:
        def __str__(self) -> str:
            return f"odd object holding {CONNINFO_PASSWORD}"

    errors = notify(policy_for(webhook=generic.url(WEBHOOK_PATH)), failed(thing=Odd(), when=datetime.now(UTC)),
                    environ=NO_ENV)
    assert errors == []
    assert generic.received[0].json["details"]["thing"] == "odd object holding ***"


def test_an_event_has_a_known_status() -> None:
    with pytest.raises(ValueError, match="status must be"):
        AlertEvent(cluster="main", job="backup", status="broken", message="", details={})  # type: ignore[arg-type]


# Prometheus alert rules -----------------------------------------------------------------------


def test_the_alert_rules_are_well_formed_and_use_pgvault_metrics() -> None:
    rules_file = yaml.safe_load(RULES.read_text())
    rules = [rule for group in rules_file["groups"] for rule in group["rules"]]
    assert all(group["name"] and group["rules"] for group in rules_file["groups"])

    names = {rule["alert"] for rule in rules}
    assert {"PgvaultNoRecentBackup", "PgvaultWalArchivingStalled", "PgvaultVerifyFailed",
            "PgvaultDrillFailed"} <= names
    assert len(names) == len(rules)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description"} <= set(rule["annotations"])
        assert "{{ $labels.cluster }}" in rule["annotations"]["summary"]
        assert isinstance(rule["for"], str) and rule["for"][:-1].isdigit() and rule["for"][-1] in "smh"
        used = {word for word in _identifiers(rule["expr"]) if word.startswith("pgvault_")}
        assert used, f"{rule['alert']} uses no pgvault metric"
        assert used <= set(METRICS), f"{rule['alert']} uses unknown metrics {used - set(METRICS)}"


def test_the_alert_thresholds_are_the_promised_ones() -> None:
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert "pgvault_last_backup_timestamp_seconds > 26 * 3600" in rules["PgvaultNoRecentBackup"]["expr"]
    assert rules["PgvaultWalArchivingStalled"]["expr"] == "pgvault_wal_archive_lag_seconds > 15 * 60"
    assert rules["PgvaultVerifyFailed"]["expr"] == "pgvault_verify_last_success == 0"
    assert rules["PgvaultDrillFailed"]["expr"] == "pgvault_drill_last_success == 0"


def _identifiers(expr: str) -> set[str]:
    import re

    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
