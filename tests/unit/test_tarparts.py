"""Guarantee 8, safe extraction: tarparts.extract never writes outside the target directory.

Every test builds a hostile tar part in memory, extracts it into `root`, and checks both that
UnsafeArchive is raised and that nothing appeared (or changed) outside `root`.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from pgvault import tarparts
from pgvault.errors import UnsafeArchive


def _file(name: str, data: bytes = b"payload", mode: int = 0o600) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _dir(name: str, mode: int = 0o700) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def _tar(members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def _snapshot(path: Path, skip: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every entry under path (except the skip subtree): mode, size and content or link target."""
    seen: dict[str, tuple[int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full == skip:
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                content: bytes | str | None = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = full.read_bytes()
            else:
                content = None
            seen[str(full.relative_to(path))] = (st.st_mode, st.st_size, content)
    seen["."] = (path.stat().st_mode, 0, None)
    return seen


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(root to extract into, the directory around it with a bystander file and directory)."""
    outer = tmp_path / "outer"
    root = outer / "root"
    root.mkdir(parents=True)
    (outer / "bystander").write_bytes(b"untouched")
    (outer / "elsewhere").mkdir(mode=0o755)
    os.chmod(outer / "elsewhere", 0o755)
    return root, outer


def _assert_refused(members: list[tuple[tarfile.TarInfo, bytes | None]], root: Path, outer: Path,
                    match: str) -> None:
    before = _snapshot(outer, skip=root)
    with pytest.raises(UnsafeArchive, match=match):
        tarparts.extract(_tar(members), root)
    assert _snapshot(outer, skip=root) == before, "something outside the data directory changed"
    # And no file appeared outside root anywhere up the tree (e.g. in the pytest tmp dir itself).
    assert sorted(p.name for p in outer.parent.iterdir()) == ["outer"]


def test_a_plain_part_extracts_inside_root(sandbox: tuple[Path, Path]) -> None:
    root, _outer = sandbox
    members = [_dir("base"), _file("base/1", b"one"), _file("PG_VERSION", b"15\n"), _symlink("base/self", ".")]
    stats = tarparts.extract(_tar(members), root)
    assert stats.files == 2
    assert (root / "base" / "1").read_bytes() == b"one"
    assert (root / "PG_VERSION").read_bytes() == b"15\n"
    assert os.readlink(root / "base" / "self") == "."
    assert not [p for p in root.rglob(".*pgvault-tmp")], "temp files left behind"


@pytest.mark.parametrize("name", ["/tmp/pgvault-escape-abs", "//etc/pgvault-escape", "/"])
def test_absolute_member_names_are_refused(sandbox: tuple[Path, Path], name: str) -> None:
    root, outer = sandbox
    _assert_refused([_file("ok", b"x"), _file(name, b"evil")], root, outer, "outside the data directory")
    assert not Path("/tmp/pgvault-escape-abs").exists()
    assert not Path("/etc/pgvault-escape").exists()


def test_absolute_name_pointing_into_the_sandbox_is_refused(sandbox: tuple[Path, Path]) -> None:
    root, outer = sandbox
    _assert_refused([_file(str(outer / "planted"), b"evil")], root, outer, "outside the data directory")
    assert not (outer / "planted").exists()


@pytest.mark.parametrize("name", ["../planted", "base/../../planted", "./../planted", "base/..", ".."])
def test_dot_dot_member_names_are_refused(sandbox: tuple[Path, Path], name: str) -> None:
    root, outer = sandbox
    _assert_refused([_dir("base"), _file(name, b"evil")], root, outer, "outside the data directory")
    assert not (outer / "planted").exists()


def test_dot_dot_directory_member_is_refused(sandbox: tuple[Path, Path]) -> None:
    root, outer = sandbox
    _assert_refused([_dir("../newdir", mode=0o777)], root, outer, "outside the data directory")
    assert not (outer / "newdir").exists()


def test_symlink_escaping_the_tree_then_a_file_through_it(sandbox: tuple[Path, Path]) -> None:
    root, outer = sandbox
    members = [_symlink("escape", "../elsewhere"), _file("escape/planted", b"evil")]
    _assert_refused(members, root, outer, "links outside the data directory")
    assert not (outer / "elsewhere" / "planted").exists()
    assert not (root / "escape").is_symlink()


def test_absolute_symlink_then_a_file_through_it(sandbox: tuple[Path, Path]) -> None:
    root, outer = sandbox
    members = [_symlink("pg_tblspc_link", str(outer / "elsewhere")), _file("pg_tblspc_link/planted", b"evil")]
    _assert_refused(members, root, outer, "links outside the data directory")
    assert not (outer / "elsewhere" / "planted").exists()


def test_deep_symlink_escaping_through_dot_dot(sandbox: tuple[Path, Path]) -> None:
    root, outer = sandbox
    members = [_dir("a"), _dir("a/b"), _symlink("a/b/up", "../../../elsewhere"), _file("a/b/up/planted", b"evil")]
    _assert_refused(members, root, outer, "links outside the data directory")
    assert not (outer / "elsewhere" / "planted").exists()


def test_symlink_chain_that_only_escapes_when_resolved(sandbox: tuple[Path, Path]) -> None:
    # "self" -> "." is harmless; "up" -> "self/.." looks like "." lexically but the kernel resolves
    # it to root's parent. A file written through "up" must still be refused.
    root, outer = sandbox
    members = [_symlink("self", "."), _symlink("up", "self/.."), _file("up/elsewhere/planted", b"evil")]
    _assert_refused(members, root, outer, "outside the data directory")
    assert not (outer / "elsewhere" / "planted").exists()


def test_directory_member_through_escaping_symlink_chain_changes_nothing_outside(sandbox: tuple[Path, Path]) -> None:
    # A directory member named like a link that resolves outside must not chmod the outside directory.
    root, outer = sandbox
    members = [_symlink("self", "."), _symlink("up", "self/.."), _dir("up", mode=0o777)]
    _assert_refused(members, root, outer, "outside the data directory")
    assert stat.S_IMODE(outer.stat().st_mode) != 0o777


def test_link_planted_in_root_before_extraction_is_not_followed(sandbox: tuple[Path, Path]) -> None:
    # A delta restore reuses a directory that may already hold a link pointing outside.
    root, outer = sandbox
    (root / "pg_wal").symlink_to(outer / "elsewhere")
    _assert_refused([_file("pg_wal/000000010000000000000001", b"evil")], root, outer, "through a link")
    assert list((outer / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    ("member", "label"),
    [
        (_special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), "character device"),
        (_special("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
        (_special("fifo", tarfile.FIFOTYPE), "fifo"),
        (_special("hardlink", tarfile.LNKTYPE, linkname="/etc/passwd"), "hard link"),
    ],
)
def test_special_members_are_refused(sandbox: tuple[Path, Path], member: tuple[tarfile.TarInfo, None],
                                     label: str) -> None:
    root, outer = sandbox
    _assert_refused([member], root, outer, "which a data directory never holds")
    leftovers = [p for p in root.rglob("*")]
    assert all(p.is_dir() or p.is_file() for p in leftovers), f"{label} created: {leftovers}"
    assert not any(stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode)
                   or stat.S_ISFIFO(p.lstat().st_mode) for p in leftovers)
