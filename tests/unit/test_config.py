"""The policy file: the shipped examples load, sizes and durations parse, every mistake is one clear line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault.config import Policy, load_policy, parse_duration, parse_policy, parse_size
from pgvault.errors import ConfigError

POLICIES = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"))


def test_the_shipped_policies_load() -> None:
    assert POLICIES, "policies/ holds no example policy"
    for path in POLICIES:
        policy = load_policy(path)
        assert policy.repository.url.startswith("file:///")
        assert policy.postgres.conninfo
        assert "password" not in policy.postgres.conninfo.lower(), f"{path.name} carries a password"
        assert Policy.model_validate(policy.model_dump()) == policy


def test_the_platform_policy() -> None:
    policy = load_policy(Path(__file__).resolve().parents[2] / "policies" / "platform.yaml")
    assert policy.cluster == "platform"
    assert policy.backup.part_size == 256 * 1024**2
    assert policy.retention.pitr_window == timedelta(days=7)


# ---- sizes ----------------------------------------------------------------------------------------

UNITS = {"": 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2, "GB": 1000**3, "GiB": 1024**3,
         "TB": 1000**4, "TiB": 1024**4}


@pytest.mark.parametrize(("value", "expected"), [
    ("256MiB", 256 * 1024**2), ("1GiB", 1024**3), ("1 KB", 1000), ("10", 10), (10, 10), ("1mib", 1024**2),
    (" 2 TiB ", 2 * 1024**4), (0, 0),
])
def test_parse_size(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]))
def test_parse_size_every_unit(number: int, unit: str, space: str) -> None:
    assert parse_size(f"{number}{space}{unit}") == number * UNITS[unit]
    assert parse_size(f"{number}{unit.lower()}") == number * UNITS[unit]


@pytest.mark.parametrize("value", ["lots", "", "1.5GiB", "-1", "1PB", "MiB", "1 MiB 2", True, False, 1.5, None])
def test_parse_size_rejects_with_an_example(value: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


# ---- durations ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("12h", timedelta(hours=12)),
    ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), (" 7 d ", timedelta(days=7)),
    ("0s", timedelta(0)), (timedelta(hours=1), timedelta(hours=1)),
])
def test_parse_duration(value: Any, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["s", "m", "h", "d", "w", "S", "D", "W"]))
def test_parse_duration_every_unit(number: int, unit: str) -> None:
    # Units are case-insensitive, like sizes (1mib == 1MiB).
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[unit.lower()]
    assert parse_duration(f"{number}{unit}") == timedelta(seconds=number * seconds)


@pytest.mark.parametrize("value", ["forever", "", "7", 7, "1.5h", "7 days", "-1d", "1y", None])
def test_parse_duration_rejects_with_an_example(value: Any) -> None:
    with pytest.raises(ValueError, match=r"is not a duration; write e\.g\. 90s, 15m, 12h, 7d or 2w"):
        parse_duration(value)


# ---- the policy model ------------------------------------------------------------------------------

def minimal() -> dict[str, Any]:
    return {"cluster": "main", "postgres": {"conninfo": "host=127.0.0.1"},
            "repository": {"url": "file:///var/lib/pgvault"}}


def refused(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_policy(data, "p.yaml")
    assert caught.value.exit_code == 2
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("p.yaml: ")
    return message


def test_minimal_policy_gets_the_defaults() -> None:
    policy = parse_policy(minimal(), "p.yaml")
    assert policy.compression.level == 3
    assert policy.backup.part_size == 256 * 1024**2
    assert policy.backup.checkpoint == "fast"
    assert policy.retention.pitr_window == timedelta(days=7)
    assert policy.repository.path == Path("/var/lib/pgvault")


@pytest.mark.parametrize("field", ["cluster", "postgres", "postgres.conninfo", "repository", "repository.url"])
def test_missing_required_fields(field: str) -> None:
    data = minimal()
    *parents, leaf = field.split(".")
    section = data
    for part in parents:
        section = section[part]
    del section[leaf]
    assert refused(data) == f"p.yaml: {field} is required; add it"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cluster", 5, "cluster must be text (quote it), not 5"),
    ("postgres", "str", "postgres must be a section: its settings as 'key: value' lines indented under it, "
                        "not 'str'"),
    ("postgres", None, "postgres must be a section"),
    ("compression.level", "high", "compression.level must be a whole number, not 'high'"),
    ("compression.level", 0, "compression.level must be at least 1, not 0"),
    ("compression.threads", 2.5, "compression.threads must be a whole number, not 2.5"),
    ("backup.part_size", "lots", "backup.part_size: 'lots' is not a size; write e.g. 256MiB or 1GiB"),
    ("backup.part_size", "1KiB", "backup.part_size must be at least 1048576, not 1024"),
    ("backup.checkpoint", "slow", "backup.checkpoint must be 'fast' or 'spread', not 'slow'"),
    ("retention.pitr_window", "forever", "retention.pitr_window: 'forever' is not a duration; write e.g."),
    ("retention.timezone", "Mars/Olympus", "retention.timezone: unknown time zone 'Mars/Olympus'; use an IANA"),
    ("repository.url", "s3://Bad_Bucket/x", "repository.url: 'Bad_Bucket' is not a valid bucket name"),
    ("repository.url", "s3://", "repository.url: 's3://' names no bucket"),
    ("repository.url", "ftp://h/x", "repository.url: unsupported scheme 'ftp'"),
    ("repository.url", "file:relative/x", "repository.url: a file repository needs an absolute path"),
    ("repository.url", "file://var/lib/pgvault", "repository.url: 'file://var/lib/pgvault' names a host (var); "
                                                 "a file repository needs three slashes, e.g. file:///var/lib"),
    ("cluster", "a b", "cluster: must be 1-63 letters, digits"),
])
def test_wrong_values_say_what_to_write(field: str, value: Any, message: str) -> None:
    data = minimal()
    *parents, leaf = field.split(".")
    section = data
    for part in parents:
        section = section.setdefault(part, {})
    section[leaf] = value
    said = refused(data)
    assert said.startswith(f"p.yaml: {message}"), said
    assert "Input should" not in said and "Config" not in said


@pytest.mark.parametrize(("where", "key"), [((), "retension"), (("backup",), "partsize"), (("schedule",), "drills")])
def test_unknown_keys(where: tuple[str, ...], key: str) -> None:
    data = minimal()
    section = data
    for part in where:
        section = section.setdefault(part, {})
    section[key] = 1
    dotted = ".".join((*where, key))
    assert refused(data) == f"p.yaml: unknown key {dotted}; remove it or check its spelling"


@pytest.mark.parametrize("data", [None, [], "cluster: main", 5])
def test_a_policy_must_be_a_mapping(data: Any) -> None:
    assert "expected a mapping of settings at the top level; write 'key: value' lines" in refused(data)


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_policy(tmp_path / "nope.yaml")
    assert caught.value.hint == "check --config / PGVAULT_CONFIG"
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster: main\npostgres: {conninfo: x\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line \d+; fix the syntax"):
        load_policy(broken)
    with pytest.raises(ConfigError, match="cannot read policy file") as caught:
        load_policy(tmp_path)
    assert caught.value.hint is not None
