"""The tar stream is cut at member boundaries into parts that are each a complete tar archive."""

from __future__ import annotations

import hashlib
import io
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from pgvault.streams import ChunkReader
from pgvault.tarparts import TarSplitter


def _tar(files: list[tuple[str, bytes]], manifest: bytes | None = b'{"WAL-Ranges": []}') -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if manifest is not None:
            info = tarfile.TarInfo("backup_manifest")
            info.size = len(manifest)
            archive.addfile(info, io.BytesIO(manifest))
    return buffer.getvalue()


def _split(stream: bytes, part_size: int) -> tuple[list[bytes], list, dict[str, bytes]]:
    splitter = TarSplitter(io.BytesIO(stream), part_size)
    parts, stats = [], []
    for chunks, part_stats in splitter.parts():
        parts.append(ChunkReader(chunks).read())
        stats.append(part_stats)
    return parts, stats, splitter.captured


files_strategy = st.lists(
    st.tuples(st.from_regex(r"[a-z]{1,12}", fullmatch=True), st.binary(max_size=5000)),
    min_size=1, max_size=25, unique_by=lambda f: f[0],
)


@settings(max_examples=60, deadline=None)
@given(files=files_strategy, part_size=st.integers(min_value=512, max_value=20000))
def test_parts_are_complete_archives_that_together_hold_every_member(files, part_size) -> None:
    parts, stats, captured = _split(_tar(files), part_size)
    seen = []
    for part, part_stats in zip(parts, stats, strict=True):
        assert len(part) == part_stats.raw_size
        assert hashlib.sha256(part).hexdigest() == part_stats.sha256
        with tarfile.open(fileobj=io.BytesIO(part), mode="r:") as archive:
            members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
        assert members, "a part never comes out empty"
        assert len(members) == part_stats.members
        seen.extend(members)
    assert seen == files
    assert captured["backup_manifest"] == b'{"WAL-Ranges": []}'


def test_a_part_closes_at_the_first_member_boundary_past_the_part_size() -> None:
    files = [(f"f{i}", bytes([i]) * 3000) for i in range(10)]
    _parts, stats, _ = _split(_tar(files), part_size=7000)
    # Each member is 512 header + 3072 data = 3584 bytes: two members pass 7000 bytes.
    assert [s.members for s in stats] == [2, 2, 2, 2, 2]


def test_backup_label_is_kept_in_its_part_and_also_captured() -> None:
    label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    parts, _stats, captured = _split(_tar([("backup_label", label), ("PG_VERSION", b"15\n")]), 1 << 20)
    assert captured["backup_label"] == label
    with tarfile.open(fileobj=io.BytesIO(parts[0]), mode="r:") as archive:
        assert archive.extractfile("backup_label").read() == label
        assert "backup_manifest" not in archive.getnames()


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=30),
       sizes=st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=20))
def test_chunk_reader_returns_every_byte_once_in_order_whatever_the_read_sizes(chunks, sizes) -> None:
    reader = ChunkReader(iter(chunks))
    out = bytearray()
    for size in sizes * 10:
        data = reader.read(size)
        assert len(data) <= size
        out += data
    out += reader.read()
    assert bytes(out) == b"".join(chunks)
    assert reader.read(10) == b""
