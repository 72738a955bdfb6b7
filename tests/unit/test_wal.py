"""WAL names, LSNs, history files and the long page header: pure functions, checked exhaustively."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault.pg.wal import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    TimelineSwitch,
    WalSegment,
    is_archivable,
    is_backup_history,
    is_history,
    is_partial,
    is_segment,
    parse_history,
    parse_long_header,
    segments_between,
)

SEGMENT_SIZES = [2**n for n in range(20, 31)]  # 1 MiB .. 1 GiB, the sizes initdb --wal-segsize allows
MiB = 1024 * 1024

lsns = st.integers(min_value=0, max_value=2**64 - 1)
timelines = st.integers(min_value=1, max_value=2**32 - 1)


@st.composite
def segments(draw: st.DrawFn) -> WalSegment:
    size = draw(st.sampled_from(SEGMENT_SIZES))
    number = draw(st.integers(min_value=0, max_value=2**64 // size - 1))
    return WalSegment(draw(timelines), number, size)


# ---- Lsn ------------------------------------------------------------------------------------------

@given(lsns)
def test_lsn_text_round_trip(value: int) -> None:
    lsn = Lsn(value)
    text = str(lsn)
    assert Lsn.parse(text) == lsn
    high, low = text.split("/")
    assert text == text.upper()
    assert int(high, 16) == value >> 32 and int(low, 16) == value & 0xFFFFFFFF
    assert Lsn.parse(text.lower()) == lsn
    assert Lsn.parse(f"  {text}\n") == lsn


@given(lsns, lsns)
def test_lsns_order_as_their_values(a: int, b: int) -> None:
    assert (Lsn(a) < Lsn(b)) == (a < b)
    assert (Lsn(a) == Lsn(b)) == (a == b)


@pytest.mark.parametrize(("text", "value"), [
    ("0/0", 0), ("0/3000028", 0x3000028), ("1/0", 2**32), ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ("00000000/00000001", 1), ("16/B374D848", 0x16B374D848),
])
def test_lsn_parse_known_values(text: str, value: int) -> None:
    assert Lsn.parse(text).value == value


@pytest.mark.parametrize("text", ["", "3000028", "0x0/1", "0/", "/0", "1/2/3", "123456789/0", "0/123456789",
                                  "G/0", "-1/0", "0 / 1", "0/3000028 junk"])
def test_lsn_parse_rejects_garbage_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not an LSN; write it as PostgreSQL does, e\.g\. 0/3000028"):
        Lsn.parse(text)


def test_lsn_segment_number() -> None:
    assert Lsn.parse("0/3000028").segment_number() == 3
    assert Lsn.parse("1/0").segment_number() == 256
    assert Lsn.parse("1/0").segment_number(1024 * MiB) == 4
    assert Lsn(MiB - 1).segment_number(MiB) == 0 and Lsn(MiB).segment_number(MiB) == 1


# ---- WalSegment -----------------------------------------------------------------------------------

@given(segments())
def test_segment_name_number_round_trip(seg: WalSegment) -> None:
    name = seg.name
    assert len(name) == 24 and is_segment(name)
    assert WalSegment.parse(name, seg.segment_size) == seg
    per_log = 2**32 // seg.segment_size
    assert int(name[:8], 16) == seg.timeline
    assert int(name[8:16], 16) * per_log + int(name[16:], 16) == seg.number
    assert int(name[16:], 16) < per_log  # the low part never spills into the "log" part
    assert str(seg) == name


@given(segments())
def test_segment_names_sort_as_segments(seg: WalSegment) -> None:
    after = seg.next()
    if after.number < 2**64 // seg.segment_size:
        assert seg.name < after.name
        assert seg < after


@pytest.mark.parametrize(("lsn", "size", "name"), [
    ("0/3000028", 16 * MiB, "000000010000000000000003"),
    ("0/FFFFFFFF", 16 * MiB, "0000000100000000000000FF"),
    ("1/0", 16 * MiB, "000000010000000100000000"),
    ("1/40000000", 1024 * MiB, "000000010000000100000001"),
    ("2/100000", MiB, "000000010000000200000001"),
    ("0/7FFFFFF", 64 * MiB, "000000010000000000000001"),
])
def test_containing_matches_postgresql_names(lsn: str, size: int, name: str) -> None:
    seg = WalSegment.containing(1, Lsn.parse(lsn), size)
    assert seg.name == name
    assert WalSegment.parse(name, size) == seg


@given(st.sampled_from(SEGMENT_SIZES), timelines, lsns)
def test_containing_holds_the_lsn(size: int, timeline: int, value: int) -> None:
    seg = WalSegment.containing(timeline, Lsn(value), size)
    assert seg.timeline == timeline
    assert seg.start_lsn <= Lsn(value) < Lsn(seg.end_lsn.value)
    assert seg.end_lsn.value - seg.start_lsn.value == size
    assert seg.start_lsn.value % size == 0


@given(segments())
def test_next_is_the_adjacent_segment(seg: WalSegment) -> None:
    after = seg.next()
    assert (after.timeline, after.number, after.segment_size) == (seg.timeline, seg.number + 1, seg.segment_size)
    assert after.start_lsn == seg.end_lsn


def test_next_wraps_the_log_part_of_the_name() -> None:
    assert WalSegment.parse("0000000100000000000000FF").next().name == "000000010000000100000000"
    assert WalSegment.parse("000000020000000000000003", 1024 * MiB).next().name == "000000020000000100000000"


def test_segments_between() -> None:
    first = WalSegment.parse("0000000200000000000000FE")
    last = WalSegment.parse("000000020000000100000001")
    names = [s.name for s in segments_between(first, last)]
    assert names == ["0000000200000000000000FE", "0000000200000000000000FF",
                     "000000020000000100000000", "000000020000000100000001"]
    assert segments_between(last, first) == []
    assert segments_between(first, first) == [first]


@pytest.mark.parametrize("name", ["", "00000001000000000000000", "0000000100000000000000001",
                                  "00000001000000000000000g", "000000010000000000000003.partial",
                                  "00000001.history", "pg_wal/000000010000000000000003"])
def test_segment_parse_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError, match="is not a WAL segment name"):
        WalSegment.parse(name)


def test_default_segment_size_is_16_mib() -> None:
    assert WalSegment(1, 3).segment_size == DEFAULT_SEGMENT_SIZE
    assert WalSegment(1, 3).start_lsn == Lsn(3 * 16 * MiB)


# ---- name classes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind"), [
    ("000000010000000000000003", "segment"),
    ("000000010000000000000003.partial", "partial"),
    ("00000002.history", "history"),
    ("000000010000000000000002.00000028.backup", "backup"),
    ("00000001000000000000000a", None),  # PostgreSQL writes upper case only
    ("00000002.History", None),
    ("RECOVERYXLOG", None),
    ("RECOVERYHISTORY", None),
    ("000000010000000000000003.zst", None),
    ("archive_status", None),
    ("", None),
])
def test_name_classes(name: str, kind: str | None) -> None:
    assert is_segment(name) == (kind == "segment")
    assert is_partial(name) == (kind == "partial")
    assert is_history(name) == (kind == "history")
    assert is_backup_history(name) == (kind == "backup")
    assert is_archivable(name) == (kind is not None)


# ---- history files --------------------------------------------------------------------------------

def test_parse_history_as_postgresql_writes_it() -> None:
    text = (
        "1\t0/3000158\tno recovery target specified\n"
        "\n"
        "2\t0/5000028\tbefore 2026-11-20 14:30:00.000001+00\n"
        "# a comment\n"
        "3\t1/A0\tat restore point \"pre upgrade\"\n"
    )
    assert parse_history(text) == [
        TimelineSwitch(1, Lsn(0x3000158), "no recovery target specified"),
        TimelineSwitch(2, Lsn(0x5000028), "before 2026-11-20 14:30:00.000001+00"),
        TimelineSwitch(3, Lsn(2**32 + 0xA0), 'at restore point "pre upgrade"'),
    ]


def test_parse_history_without_reasons_and_empty() -> None:
    assert parse_history("1 0/3000000\n") == [TimelineSwitch(1, Lsn(0x3000000), "")]
    assert parse_history("") == []
    assert parse_history("\n# only a comment\n") == []


@given(st.lists(st.tuples(timelines, lsns, st.text(alphabet="abc xyz:+-0123456789", max_size=30)), max_size=8))
def test_parse_history_round_trip(lines: list[tuple[int, int, str]]) -> None:
    text = "".join(f"{tli}\t{Lsn(lsn)}\t{reason}\n" for tli, lsn, reason in lines)
    assert parse_history(text) == [TimelineSwitch(tli, Lsn(lsn), reason.strip()) for tli, lsn, reason in lines]


@pytest.mark.parametrize("text", ["1\n", "x\t0/1\treason\n", "1\tnot-an-lsn\treason\n"])
def test_parse_history_rejects_malformed_lines(text: str) -> None:
    with pytest.raises(ValueError):
        parse_history(text)


# ---- the long page header -------------------------------------------------------------------------

XLOG_PAGE_MAGIC_PG15 = 0xD110
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004


def long_header(magic: int, info: int, tli: int, pageaddr: int, sysid: int, seg_size: int,
                blcksz: int = 8192) -> bytes:
    # XLogLongPageHeaderData on a 64-bit little-endian machine: the 8-byte xlp_sysid is aligned to 24.
    header = struct.pack("<HHIQI", magic, info, tli, pageaddr, 0) + b"\0" * 4
    header += struct.pack("<QII", sysid, seg_size, blcksz)
    assert len(header) == 40
    return header + b"\0" * (blcksz - len(header))


@given(timelines, st.sampled_from(SEGMENT_SIZES), st.integers(min_value=0, max_value=2**64 - 1),
       st.integers(min_value=0, max_value=2**64 - 1))
def test_parse_long_header_reads_every_field(tli: int, size: int, number: int, sysid: int) -> None:
    seg = WalSegment(tli, number % (2**64 // size), size)
    data = long_header(XLOG_PAGE_MAGIC_PG15, XLP_LONG_HEADER | XLP_BKP_REMOVABLE, tli, seg.start_lsn.value, sysid,
                       size)
    header = parse_long_header(data)
    assert header.magic == XLOG_PAGE_MAGIC_PG15
    assert header.timeline == tli
    assert header.page_address == seg.start_lsn
    assert header.system_id == sysid
    assert header.segment_size == size
    assert header.block_size == 8192


def test_parse_long_header_refuses_a_short_page_header() -> None:
    data = long_header(XLOG_PAGE_MAGIC_PG15, 0, 1, 0x3000000, 7, 16 * MiB)
    with pytest.raises(ValueError, match="lacks the long header"):
        parse_long_header(data)


@pytest.mark.parametrize("length", [0, 1, 24, 39])
def test_parse_long_header_refuses_truncated_data(length: int) -> None:
    data = long_header(XLOG_PAGE_MAGIC_PG15, XLP_LONG_HEADER, 1, 0, 7, 16 * MiB)[:length]
    with pytest.raises(ValueError, match="too short"):
        parse_long_header(data)
