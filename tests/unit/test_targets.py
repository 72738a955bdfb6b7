"""Recovery targets: times need a zone, one target at a time, modifiers only with a target."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault.errors import UsageError
from pgvault.pg.wal import Lsn
from pgvault.targets import RecoveryTarget, make_target, parse_target_time, parse_timeline


def tz(hours: int, minutes: int = 0) -> timezone:
    sign = -1 if hours < 0 else 1
    return timezone(sign * timedelta(hours=abs(hours), minutes=minutes))


# ---- parse_target_time ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-20 14:30:00+00", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
    ("2026-11-20 14:30:00+00:00", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
    ("2026-11-20T14:30:00Z", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
    ("2026-11-20t14:30:00z", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
    ("2026-11-20 14:30:00Z", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
    ("2026-11-20 14:30:00+05:30", datetime(2026, 11, 20, 14, 30, tzinfo=tz(5, 30))),
    ("2026-11-20 14:30:00+0530", datetime(2026, 11, 20, 14, 30, tzinfo=tz(5, 30))),
    ("2026-11-20 14:30:00-03", datetime(2026, 11, 20, 14, 30, tzinfo=tz(-3))),
    ("2026-11-20 14:30:00-0330", datetime(2026, 11, 20, 14, 30, tzinfo=tz(-3, 30))),
    ("2026-11-20 14:30:00.123456+00", datetime(2026, 11, 20, 14, 30, 0, 123456, tzinfo=UTC)),
    ("2026-11-20 14:30:00.5+01", datetime(2026, 11, 20, 14, 30, 0, 500000, tzinfo=tz(1))),
    ("2026-11-20 14:30:00.123+05:30", datetime(2026, 11, 20, 14, 30, 0, 123000, tzinfo=tz(5, 30))),
    ("  2026-11-20 14:30:00+00\n", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
])
def test_parse_target_time_accepts(text: str, expected: datetime) -> None:
    parsed = parse_target_time(text)
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30)),
       st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
       st.sampled_from(["iso", "iso-T", "postgres", "compact"]))
def test_parse_target_time_round_trips_every_aware_time(naive: datetime, offset_minutes: int, style: str) -> None:
    moment = naive.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = {
        "iso": moment.isoformat(sep=" "),
        "iso-T": moment.isoformat(),
        # PostgreSQL prints +HH when the offset is whole hours, +HH:MM otherwise.
        "postgres": moment.isoformat(sep=" ").removesuffix(":00") if offset_minutes % 60 == 0
        else moment.isoformat(sep=" "),
        "compact": moment.strftime("%Y-%m-%d %H:%M:%S.%f%z"),
    }[style]
    parsed = parse_target_time(text)
    assert parsed == moment
    assert parsed.utcoffset() == moment.utcoffset()


@pytest.mark.parametrize("text", ["2026-11-20 14:30:00", "2026-11-20T14:30:00.25", "2026-11-20 14:30"])
def test_parse_target_time_rejects_a_time_without_zone(text: str) -> None:
    with pytest.raises(ValueError, match="has no time zone; add one") as caught:
        parse_target_time(text)
    assert f"'{text}+00'" in str(caught.value)  # the fix, spelled out, and it works:
    assert parse_target_time(f"{text}+00").tzinfo is not None


@pytest.mark.parametrize("text", ["2026-11-20", "2026-11-20+00", "2026-11-20+05:30", "2026-11-20Z", "20261120"])
def test_parse_target_time_rejects_a_date_alone_and_the_fix_works(text: str) -> None:
    # Python alone would read '2026-11-20+05' as five o'clock without a zone.
    with pytest.raises(ValueError, match=r"has no time of day; write e\.g\.") as caught:
        parse_target_time(text)
    example = str(caught.value).split("write e.g. ")[1].strip("'")
    assert parse_target_time(example) == datetime(2026, 11, 20, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01 00:00:00+00", "2026-11-20 25:00:00+00",
                                  "14:30+00", "2026/11/20 14:30:00+00", "2026-11-20 14:30:00 UTC",
                                  "2026-11-20 14:30:00+25", "now"])
def test_parse_target_time_rejects_garbage_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time; write e\.g\. '2026-11-20 14:30:00\+00'"):
        parse_target_time(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_target_time_rejects_empty(text: str) -> None:
    with pytest.raises(ValueError, match="is empty; give a time such as"):
        parse_target_time(text)


# ---- parse_timeline -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("current", "current"), ("LATEST", "latest"), (" latest ", "latest"), ("1", 1), ("42", 42), ("0x10", 16),
])
def test_parse_timeline_accepts(text: str, expected: object) -> None:
    assert parse_timeline(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("banana", "is not a timeline; use current, latest or a number"),
    ("", "is not a timeline"),
    ("1.5", "is not a timeline"),
    ("0", "timelines start at 1"),
    ("-2", "timelines start at 1"),
])
def test_parse_timeline_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_timeline(text)


# ---- make_target ----------------------------------------------------------------------------------

WHEN = datetime(2026, 11, 20, 14, 30, tzinfo=UTC)
LSN = Lsn.parse("0/3000028")

ONE_EACH = {
    "--target-time": {"time": WHEN},
    "--target-lsn": {"lsn": LSN},
    "--target-xid": {"xid": 1234},
    "--target-name": {"name": "before-upgrade"},
    "--target immediate": {"immediate": True},
}


@pytest.mark.parametrize("flags", [(a, b) for a in ONE_EACH for b in ONE_EACH if a < b])
def test_make_target_refuses_two_targets(flags: tuple[str, str]) -> None:
    kwargs = {**ONE_EACH[flags[0]], **ONE_EACH[flags[1]]}
    with pytest.raises(UsageError) as caught:
        make_target(**kwargs)
    error = caught.value
    assert error.exit_code == 2
    assert "give one recovery target" in error.message
    for flag in flags:
        assert flag in error.message
    assert error.hint is not None and "drop all but one" in error.hint


def test_make_target_refuses_all_targets_at_once() -> None:
    with pytest.raises(UsageError, match="give one recovery target"):
        make_target(time=WHEN, lsn=LSN, xid=5, name="p", immediate=True)


@pytest.mark.parametrize("kwargs", [{}, {"immediate": True}])
def test_make_target_refuses_exclusive_without_a_target(kwargs: dict) -> None:
    with pytest.raises(UsageError, match="--target-exclusive needs --target-time, --target-lsn or --target-xid"):
        make_target(inclusive=False, **kwargs)


def test_make_target_refuses_exclusive_with_a_restore_point() -> None:
    with pytest.raises(UsageError, match="--target-exclusive does not apply to --target-name"):
        make_target(name="p", inclusive=False)


@pytest.mark.parametrize("action", ["pause", "shutdown"])
def test_make_target_refuses_an_action_without_a_target(action: str) -> None:
    with pytest.raises(UsageError, match=f"--target-action {action} needs a recovery target"):
        make_target(action=action)


@pytest.mark.parametrize(("kwargs", "kind", "described"), [
    ({}, "end", "the end of the archived WAL"),
    ({"time": WHEN}, "time", "time 2026-11-20 14:30:00+00:00"),
    ({"lsn": LSN}, "lsn", "LSN 0/3000028"),
    ({"xid": 1234}, "xid", "xid 1234"),
    ({"name": "before-upgrade"}, "name", "restore point 'before-upgrade'"),
    ({"immediate": True}, "immediate", "the end of the backup (immediate)"),
])
def test_make_target_builds_one_target(kwargs: dict, kind: str, described: str) -> None:
    target = make_target(**kwargs)
    assert target.kind == kind
    assert target.describe() == described
    assert target.inclusive and target.action == "promote" and target.timeline == "latest"


def test_make_target_keeps_modifiers() -> None:
    target = make_target(lsn=LSN, inclusive=False, action="pause", timeline=3)
    assert target == RecoveryTarget(kind="lsn", lsn=LSN, inclusive=False, action="pause", timeline=3)
    assert make_target(immediate=True, action="shutdown").action == "shutdown"
    assert make_target(time=WHEN, timeline="current").timeline == "current"
    assert make_target(xid=7, inclusive=False).describe() == "xid 7 (exclusive)"
