"""Patroni's REST API, read-only: who leads, which replicas stream, and how far behind they are.

The scheduler asks `GET /cluster` of the first member in `schedule.patroni_urls` that answers
(any member describes the whole cluster) and picks the one node that takes the backups.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pgvault.errors import PgvaultError
from pgvault.units import format_size

# standby_leader: the leader of a Patroni standby cluster, which is what a backup there may use.
LEADER_ROLES = ("leader", "standby_leader")
REPLICA_ROLES = ("replica", "sync_standby", "quorum_standby")
# Patroni 3.0.4+ reports a streaming replica's replication state ("streaming"); older versions, and
# replicas it cannot see streaming, report the PostgreSQL state ("running"). "in archive recovery"
# (replaying from the archive, not connected to the leader) is not healthy.
HEALTHY_REPLICA_STATES = ("running", "streaming")
LEADER_STATE = "running"

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


class PatroniError(PgvaultError):
    """Patroni's REST API cannot be read, or names no member that may take the job."""


@dataclass(frozen=True)
class Member:
    """One member as GET /cluster describes it."""

    name: str
    role: str
    state: str
    lag: int | None = None  # bytes behind the leader; None for the leader, or when Patroni says "unknown"
    tags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_leader(self) -> bool:
        return self.role in LEADER_ROLES

    @property
    def is_replica(self) -> bool:
        return self.role in REPLICA_ROLES


@dataclass(frozen=True)
class Choice:
    """The member that takes a job, and why, in words for the log."""

    member: str
    reason: str


def safe_url(url: str) -> str:
    """The URL without user:password@, for messages."""
    return _USERINFO.sub("", url)


def parse_cluster(data: Any) -> list[Member]:
    """Members from a GET /cluster answer; ValueError when it is not one."""
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list):
        raise ValueError("the answer has no 'members' list (is this Patroni's REST API?)")
    result = []
    for item in members:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("a member without a name")
        lag = item.get("lag")
        tags = item.get("tags")
        result.append(Member(
            name=item["name"], role=str(item.get("role", "")), state=str(item.get("state", "")),
            lag=lag if isinstance(lag, int) and not isinstance(lag, bool) and lag >= 0 else None,
            tags=tags if isinstance(tags, dict) else {},
        ))
    return result


class PatroniClient:
    """GET /cluster from the first of `urls` that answers within `timeout` seconds."""

    def __init__(self, urls: Sequence[str], timeout: float = 5.0) -> None:
        if not urls:
            raise ValueError("no Patroni REST API URL given")
        self.urls = list(urls)
        self.timeout = timeout

    def _get(self, url: str) -> Any:
        request = urllib.request.Request(url.rstrip("/") + "/cluster", headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read(4 * 1024 * 1024))

    def members(self) -> list[Member]:
        problems = []
        for url in self.urls:
            try:
                return parse_cluster(self._get(url))
            except urllib.error.HTTPError as exc:
                problems.append(f"{safe_url(url)}: HTTP {exc.code}")
            except urllib.error.URLError as exc:
                problems.append(f"{safe_url(url)}: {exc.reason}")
            except (OSError, http.client.HTTPException) as exc:
                problems.append(f"{safe_url(url)}: {exc}")
            except ValueError as exc:
                problems.append(f"{safe_url(url)}: not a cluster description ({exc})")
        raise PatroniError("cannot read the cluster from Patroni's REST API: " + "; ".join(problems),
                           hint="check schedule.patroni_urls (each member's REST API, e.g. http://10.0.0.1:8008) "
                           "and that Patroni runs")


def replica_problem(member: Member, max_lag: int) -> str | None:
    """Why a replica may not take a backup, or None when it is healthy."""
    if member.state not in HEALTHY_REPLICA_STATES:
        return f"{member.name} is {member.state or 'in no known state'}"
    if member.lag is None:
        return f"{member.name}'s lag is unknown"
    if member.lag > max_lag:
        return f"{member.name} lags {format_size(member.lag)} (more than {format_size(max_lag)})"
    return None


def choose_backup_member(members: Sequence[Member], prefer: Literal["leader", "replica"], max_lag: int) -> Choice:
    """The one member that takes the backup. Pure: every node given the same members picks the same one.

    "replica": the first healthy replica by name (state running/streaming, lag known and at most
    max_lag), else the running leader. "leader": the running leader. Raises PatroniError when the
    preferred member and its fallback are both missing, so a slot is never silently left untaken.

    Among healthy replicas the name decides, not the lowest lag: lag in bytes changes from moment
    to moment, so it would move the backups between replicas night by night for no gain (any healthy
    replica gives an equally valid backup), while a name changes only when health does.
    """
    leaders = [m for m in members if m.is_leader and m.state == LEADER_STATE]
    leader = min(leaders, key=lambda m: m.name) if leaders else None
    not_leading = [m for m in members if m.is_leader and m.state != LEADER_STATE]
    leader_problem = (f"the leader {not_leading[0].name} is {not_leading[0].state or 'in no known state'}"
                      if not_leading else "there is no leader")
    if prefer == "leader":
        if leader is None:
            raise PatroniError(f"no member can take the backup (backup_from: leader): {leader_problem}",
                               hint="wait for Patroni to elect a leader; the job is retried per schedule.retries")
        return Choice(leader.name, f"{leader.name} is the leader (backup_from: leader)")
    replicas = sorted((m for m in members if m.is_replica), key=lambda m: m.name)
    problems = []
    for replica in replicas:
        problem = replica_problem(replica, max_lag)
        if problem is None:
            lag = replica.lag or 0
            return Choice(replica.name,
                          f"{replica.name} is a healthy replica ({replica.state}, lag {format_size(lag)})")
        problems.append(problem)
    why = "; ".join(problems) if problems else "there are no replicas"
    if leader is None:
        raise PatroniError(f"no member can take the backup: no healthy replica ({why}) and {leader_problem}",
                           hint="wait for Patroni to recover the cluster; the job is retried per schedule.retries")
    return Choice(leader.name, f"{leader.name} is the leader; no replica is healthy ({why})")
