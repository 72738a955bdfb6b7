"""Guarantee 9: every bad input is refused with one `error:` line (plus at most one `hint:` line) that
names the field or flag and the fix, exit 2 for usage/config errors and 1 for failed operations, no
traceback, and nothing written: the repository and the target directory are byte-for-byte unchanged.

One cluster with one backup and some archived WAL serves the whole module, once per backend (a
directory, and a versioned bucket on moto_server): every test here must leave it exactly as it found
it, which is the point. The S3 cases at the end run on the S3 pass only, and also check that no
credential given in the policy or the environment is ever printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cluster, Result, make_workdir, moto, new_cluster, run_pgvault
from repos import S3_ENV, FileRepo, RepoHandle, S3Repo, free_port

from pgvault.pg.instance import chown_to_db_user

pytestmark = pytest.mark.integration

WAL_FETCH_ERROR_EXIT = 255  # cli.WAL_FETCH_ERROR_EXIT: PostgreSQL aborts recovery instead of ending it early


@dataclass
class Shared:
    cluster: Cluster
    backup_id: str
    backup_stop: datetime


@pytest.fixture(scope="module")
def shared(backend: str) -> Iterator[Shared]:
    workdir = make_workdir("pgvault-badinput-")
    made = new_cluster(workdir, backend=backend)
    try:
        made.create_table()
        made.commit_batches(1, pause=0.1)
        backup_id = made.backup()
        made.commit_batches(2, pause=0.2)
        made.flush_archive()
        record = made.ok("info", backup_id, "--json").stdout
        stop = datetime.fromisoformat(json.loads(record)["stop_time"])
        yield Shared(made, backup_id, stop)
    finally:
        with contextlib.suppress(Exception):
            made.pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


# ---- helpers --------------------------------------------------------------------------------------

def tree(root: Path) -> dict[str, str] | None:
    """Every entry under root: relative name -> kind, mode and content hash. None if root is absent."""
    if not root.exists() and not root.is_symlink():
        return None
    entries: dict[str, str] = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = f"link {os.readlink(path)}"
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = f"dir {st.st_mode:o}"
        else:
            entries[rel] = f"file {st.st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return entries


def object_versions(repo: S3Repo) -> list[tuple[str, str]]:
    """Every version and delete marker in the bucket: a rewrite with the same bytes still adds one."""
    pages = repo.client.get_paginator("list_object_versions").paginate(Bucket=repo.bucket)
    return sorted((item["Key"], item["VersionId"]) for page in pages
                  for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])])


def stored(watched: RepoHandle | Path) -> Any:
    """What a refused command must leave as it was: a directory's tree, or all a repository holds."""
    if isinstance(watched, Path):
        return tree(watched)
    state: dict[str, Any] = {"objects": watched.snapshot()}
    if isinstance(watched, FileRepo):
        state["tree"] = tree(watched.path)  # modes too, which the snapshot leaves out
    if isinstance(watched, S3Repo):
        state["versions"] = object_versions(watched)
    return state


@contextlib.contextmanager
def writes_nothing(*watched: RepoHandle | Path) -> Iterator[None]:
    before = [stored(item) for item in watched]
    yield
    for item, was in zip(watched, before, strict=True):
        name = str(item) if isinstance(item, Path) else item.url
        assert stored(item) == was, f"a refused command changed {name}"


def assert_refused(result: Result, code: int, *, names: tuple[str, ...] = (), fix: tuple[str, ...] = ()) -> str:
    """One error line (naming each of `names`), at most one hint line (the fix may be in either), nothing else.

    Returns the error line.
    """
    assert "Traceback" not in result.out, result.out
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.out}"
    assert result.stdout == "", f"a refused command printed to stdout:\n{result.stdout}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "refused without saying why"
    assert lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), (
        f"expected one error line and at most one hint line:\n{result.stderr}"
    )
    error = lines[0]
    assert "unexpected" not in error, error  # cli.main's catch-all for bugs
    for name in names:
        assert name.lower() in error.lower(), f"{name!r} not named in {error!r}"
    said = result.stderr.lower()
    for word in fix:
        assert word.lower() in said, f"fix {word!r} not in:\n{result.stderr}"
    return error


def base_policy(shared: Shared) -> dict[str, Any]:
    return yaml.safe_load(shared.cluster.config.read_text())


def write_config(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    chown_to_db_user(path)
    path.chmod(mode)
    return path


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


# ---- the policy file ------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["cluster", "postgres", "postgres.conninfo", "repository", "repository.url"])
def test_a_missing_required_field_is_named(shared: Shared, workdir: Path, field: str) -> None:
    policy = base_policy(shared)
    *parents, leaf = field.split(".")
    section = policy
    for part in parents:
        section = section[part]
    del section[leaf]
    config = write_config(workdir / "p.yaml", dump(policy))
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("backup", config=config)
    assert_refused(result, 2, names=(f"{field} is required", str(config)), fix=("add it",))


@pytest.mark.parametrize(("field", "value", "said"), [
    ("cluster", 5, "cluster must be text"),
    ("cluster", True, "cluster must be text"),
    ("cluster", "-leading-dash", "cluster: must be 1-63 letters"),
    ("postgres", "str", "postgres must be a section"),
    ("postgres", None, "postgres must be a section"),
    ("compression.level", "high", "compression.level must be a whole number"),
    ("compression.level", 99, "compression.level must be at most 19"),
    ("backup.part_size", "lots", "backup.part_size: 'lots' is not a size; write e.g. 256MiB"),
    ("backup.checkpoint", "slow", "backup.checkpoint must be 'fast' or 'spread'"),
    ("retention.pitr_window", "forever", "retention.pitr_window: 'forever' is not a duration; write e.g."),
    ("retention.timezone", "Mars/Olympus", "retention.timezone: unknown time zone"),
    ("repository.url", "/var/lib/pgvault", "repository.url: unsupported scheme"),
    ("repository.url", "file://tmp/repo", "repository.url: 'file://tmp/repo' names a host (tmp)"),
])
def test_a_wrong_type_or_value_is_named_with_what_to_write(
    shared: Shared, workdir: Path, field: str, value: Any, said: str
) -> None:
    policy = base_policy(shared)
    *parents, leaf = field.split(".")
    section = policy
    for part in parents:
        section = section.setdefault(part, {})
    section[leaf] = value
    config = write_config(workdir / "p.yaml", dump(policy))
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("backup", config=config)
    error = assert_refused(result, 2, names=(said,))
    assert "Input should be" not in error  # pydantic's wording names no fix
    assert "Config" not in error  # nor pydantic class names


@pytest.mark.parametrize(("where", "key"), [((), "retension"), (("backup",), "partsize"),
                                           (("postgres",), "conninfo_file")])
def test_an_unknown_key_is_named(shared: Shared, workdir: Path, where: tuple[str, ...], key: str) -> None:
    policy = base_policy(shared)
    section = policy
    for part in where:
        section = section.setdefault(part, {})
    section[key] = {"daily": 3} if key == "retension" else "1MiB"
    config = write_config(workdir / "p.yaml", dump(policy))
    dotted = ".".join((*where, key))
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("backup", config=config)
    assert_refused(result, 2, names=(f"unknown key {dotted}",), fix=("check its spelling",))


def test_several_problems_are_one_line(shared: Shared, workdir: Path) -> None:
    policy = base_policy(shared)
    del policy["cluster"]
    policy["retension"] = {}
    config = write_config(workdir / "p.yaml", dump(policy))
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("backup", config=config)
    assert_refused(result, 2, names=("cluster is required", "1 more problem"))


def test_a_missing_config_file(shared: Shared, workdir: Path) -> None:
    missing = workdir / "nope.yaml"
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("backup", config=missing)
    assert_refused(result, 2, names=(str(missing), "does not exist"), fix=("--config",))


def test_a_missing_config_file_from_the_environment(shared: Shared, workdir: Path) -> None:
    missing = workdir / "nope.yaml"
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("backup", env={"PGVAULT_CONFIG": str(missing)})
    assert_refused(result, 2, names=(str(missing), "does not exist"), fix=("PGVAULT_CONFIG",))


def test_an_unreadable_config_file(shared: Shared, workdir: Path) -> None:
    config = write_config(workdir / "p.yaml", shared.cluster.config.read_text(), mode=0o000)
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("backup", config=config)
    assert_refused(result, 2, names=(str(config), "cannot read", "permission denied"), fix=("readable",))


def test_a_directory_as_config_file(shared: Shared, workdir: Path) -> None:
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("backup", config=workdir)
    assert_refused(result, 2, names=(str(workdir), "cannot read"), fix=("readable",))


@pytest.mark.parametrize(("text", "said"), [
    ("cluster: test\npostgres: {conninfo: 'host=x'\nrepository:\n  url: file:///tmp/x\n", "not valid YAML at line"),
    ("cluster: test\n  postgres: x\n bad indent: [\n", "not valid YAML at line"),
    ("", "expected a mapping of settings at the top level"),
    ("- cluster: test\n", "expected a mapping of settings at the top level"),
])
def test_invalid_yaml(shared: Shared, workdir: Path, text: str, said: str) -> None:
    config = write_config(workdir / "p.yaml", text)
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("backup", config=config)
    error = assert_refused(result, 2, names=(str(config), said))
    assert "fix the syntax" in error or "write 'key: value' lines" in error


def test_no_config_at_all(shared: Shared, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGVAULT_CONFIG", raising=False)
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("backup")
    assert_refused(result, 2, names=("no policy file",), fix=("--config FILE", "PGVAULT_CONFIG"))


# ---- restore: flags that cannot work, refused before anything is read (exit 2) ---------------------

TOMORROW = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S+00")


@pytest.mark.parametrize(("flags", "names", "fix"), [
    (["--target-time", "2026-11-20 14:30:00"], ("--target-time", "has no time zone"), ("+00",)),
    (["--target-time", "2026-11-20T14:30:00.5"], ("--target-time", "has no time zone"), ("+00",)),
    (["--target-time", "last tuesday"], ("--target-time", "is not a time"), ("write e.g.",)),
    (["--target-time", ""], ("--target-time", "is empty"), ("give a time",)),
    (["--target-time", TOMORROW, "--target-lsn", "0/3000028"], ("--target-time", "--target-lsn", "one"),
     ("drop all but one",)),
    (["--target-xid", "1000", "--target-name", "x"], ("--target-xid", "--target-name"), ("drop all but one",)),
    (["--target", "immediate", "--target-lsn", "0/1"], ("--target-lsn", "--target immediate"),
     ("drop all but one",)),
    (["--delta", "--force"], ("--delta", "--force"), ("--delta keeps",)),
    (["--target-lsn", "3000028"], ("--target-lsn", "not an lsn"), ("0/3000028",)),
    (["--target-lsn", "0/XYZ"], ("--target-lsn", "not an lsn"), ("0/3000028",)),
    (["--target-timeline", "banana"], ("--target-timeline", "not a timeline"), ("current, latest or a number",)),
    (["--target-timeline", "0"], ("--target-timeline", "timelines start at 1"), ()),
    (["--target-exclusive"], ("--target-exclusive", "needs"), ("--target-time",)),
    (["--target-exclusive", "--target", "immediate"], ("--target-exclusive",), ("--target-time",)),
    (["--target-exclusive", "--target-name", "p"], ("--target-exclusive", "--target-name"), ()),
    (["--target-action", "pause"], ("--target-action", "needs a recovery target"), ()),
    (["--target-xid", "abc"], ("--target-xid",), ()),
    (["--target", "later"], ("--target",), ("immediate",)),
    (["--archive-mode", "maybe"], ("--archive-mode",), ("preserve",)),
    (["--targt-time", TOMORROW], ("--targt-time",), ("--target-time",)),
])
def test_restore_flag_errors(shared: Shared, workdir: Path, flags: list[str], names: tuple[str, ...],
                             fix: tuple[str, ...]) -> None:
    pgdata = workdir / "restored"
    with writes_nothing(shared.cluster.repo, pgdata):
        result = shared.cluster.pgvault("restore", "--pgdata", str(pgdata), *flags)
    assert_refused(result, 2, names=names, fix=fix)


def test_restore_without_pgdata_when_the_policy_has_none(shared: Shared) -> None:
    assert "pgdata" not in base_policy(shared)["postgres"]
    with writes_nothing(shared.cluster.repo):
        result = shared.cluster.pgvault("restore", "--target-time", TOMORROW)
    assert_refused(result, 2, names=("--pgdata is required", "postgres.pgdata"), fix=("--pgdata DIR",))


def test_restore_into_a_file(shared: Shared, workdir: Path) -> None:
    pgdata = write_config(workdir / "a-file", "not a directory\n")
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("restore", "--pgdata", str(pgdata))
    assert_refused(result, 2, names=("--pgdata", "is a file"))


# ---- restore: targets the repository cannot reach, and directories it must not touch (exit 1) -------

@pytest.mark.parametrize(("flags", "names", "fix"), [
    (["--target-time", "2000-01-01 00:00:00+00"], ("2000-01-01", "before the end of the earliest usable backup"),
     ("choose a later target",)),
    (["--target-time", "2000-01-01T00:00:00Z"], ("2000-01-01", "before the end of the earliest"), ("later",)),
    (["--target-lsn", "0/1"], ("LSN 0/1", "before the end of the earliest usable backup"), ("later",)),
    (["--target-time", TOMORROW], ("after the last archived WAL", "the last archived transaction ended at"),
     ("choose an earlier time",)),
    (["--target-lsn", "FF/0"], ("LSN FF/0", "after the last archived WAL record"), ("choose an earlier LSN",)),
    (["--target-xid", "4000000000"], ("xid 4000000000", "not in the archived WAL"), ("check the name or xid",)),
    (["--target-name", "no-such-point"], ("'no-such-point'", "not in the archived WAL"), ("check the name",)),
    (["--backup", "19990101T000000Z"], ("--backup 19990101T000000Z", "no such backup"), ("pgvault list",)),
    (["--target-timeline", "7"], ("timeline 7 does not exist",), ("--target-timeline latest",)),
])
def test_restore_to_an_unreachable_target(shared: Shared, workdir: Path, flags: list[str],
                                          names: tuple[str, ...], fix: tuple[str, ...]) -> None:
    pgdata = workdir / "restored"
    with writes_nothing(shared.cluster.repo, pgdata):
        result = shared.cluster.pgvault("restore", "--pgdata", str(pgdata), *flags)
    assert_refused(result, 1, names=names, fix=fix)


def test_restore_with_a_target_before_the_pinned_backup(shared: Shared, workdir: Path) -> None:
    pgdata = workdir / "restored"
    before = (shared.backup_stop - timedelta(seconds=1)).isoformat()
    with writes_nothing(shared.cluster.repo, pgdata):
        result = shared.cluster.pgvault("restore", "--pgdata", str(pgdata), "--backup", shared.backup_id,
                                        "--target-time", before)
    assert_refused(result, 1, names=(shared.backup_id, "before backup"), fix=("drop --backup",))


def test_restore_into_a_non_empty_directory(shared: Shared, workdir: Path) -> None:
    pgdata = workdir / "restored"
    pgdata.mkdir()
    (pgdata / "precious.txt").write_text("keep me\n")
    (pgdata / "sub").mkdir()
    (pgdata / "sub" / "more").write_bytes(os.urandom(64))
    chown_to_db_user(pgdata)
    with writes_nothing(shared.cluster.repo, pgdata):
        result = shared.cluster.pgvault("restore", "--pgdata", str(pgdata), "--target-time", TOMORROW)
    assert_refused(result, 1, names=("--pgdata", str(pgdata), "is not empty"), fix=("--delta", "--force"))


@pytest.mark.parametrize("via", ["--pgdata", "postgres.pgdata"])
@pytest.mark.parametrize("mode", [[], ["--force"], ["--delta"]])
def test_restore_over_a_running_postmaster_is_refused(shared: Shared, workdir: Path, mode: list[str],
                                                      via: str) -> None:
    pg = shared.cluster.pg
    pgdata = pg.pgdata
    # A live server's directory changes by itself (stats, logs); compare what a restore would touch.
    watched = ("PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "global/pg_control", "postmaster.pid")

    def state() -> dict[str, Any]:
        return {"top": sorted(p.name for p in pgdata.iterdir()),
                "files": {name: hashlib.sha256((pgdata / name).read_bytes()).hexdigest() for name in watched}}

    if via == "--pgdata":
        config, flags = shared.cluster.config, ["--pgdata", str(pgdata)]
    else:  # restore's default target: the policy's own data directory, the live server's
        policy = base_policy(shared)
        policy["postgres"]["pgdata"] = str(pgdata)
        config, flags = write_config(workdir / "p.yaml", dump(policy)), []
    before = state()
    with writes_nothing(shared.cluster.repo):
        result = run_pgvault("restore", *flags, *mode, config=config)
    assert_refused(result, 1, names=("--pgdata", "running PostgreSQL", "postmaster pid"), fix=("stop it first",))
    after = state()
    assert after["files"] == before["files"]
    assert set(after["top"]) == set(before["top"])
    for written in ("recovery.signal", "standby.signal", "backup_manifest"):
        assert not (pgdata / written).exists()
    assert pg.is_running()
    assert pg.query("SELECT count(*) FROM t")[0][0] == 15


# ---- the other commands ---------------------------------------------------------------------------

def test_wal_push_of_a_file_that_is_not_wal(shared: Shared, workdir: Path) -> None:
    path = write_config(workdir / "notes.txt", "not WAL\n")
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("wal-push", str(path))
    assert_refused(result, 2, names=("'notes.txt' is not a WAL file name",), fix=("%p",))


def test_wal_push_of_a_missing_file(shared: Shared, workdir: Path) -> None:
    path = workdir / "000000010000000000000042"
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("wal-push", str(path))
    assert_refused(result, 2, names=(str(path), "does not exist"), fix=("%p",))


def test_wal_push_of_garbage_under_a_segment_name(shared: Shared, workdir: Path) -> None:
    path = write_config(workdir / "000000010000000000000042", "not a segment\n")
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("wal-push", str(path))
    assert_refused(result, 1, names=("000000010000000000000042", "not the cluster's WAL segment size"),
                   fix=("%p",))


@pytest.mark.parametrize("name", ["pg_wal/000000010000000000000001", "00000001000000000000000", "RECOVERYXLOG",
                                  "000000010000000000000001.zst", "../../etc/passwd"])
def test_wal_fetch_of_a_bad_name(shared: Shared, workdir: Path, name: str) -> None:
    dest = workdir / "RECOVERYXLOG"
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("wal-fetch", name, str(dest))
    # Not 2: restore_command's exit codes below 126 mean "not found" and would end recovery early.
    assert_refused(result, WAL_FETCH_ERROR_EXIT, names=(repr(name), "is not a WAL file name"), fix=("%f",))


def test_wal_fetch_with_a_bad_config_stops_recovery(shared: Shared, workdir: Path) -> None:
    dest = workdir / "RECOVERYXLOG"
    with writes_nothing(shared.cluster.repo, workdir):
        result = run_pgvault("wal-fetch", "000000010000000000000001", str(dest), config=workdir / "nope.yaml")
    assert_refused(result, WAL_FETCH_ERROR_EXIT, names=("does not exist",), fix=("--config",))


def test_wal_fetch_of_a_missing_segment_is_a_silent_not_found(shared: Shared, workdir: Path) -> None:
    dest = workdir / "RECOVERYXLOG"
    with writes_nothing(shared.cluster.repo, workdir):
        result = shared.cluster.pgvault("wal-fetch", "0000000100000000000000FE", str(dest))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


@pytest.mark.parametrize("annotation", ["reason", "=nightly", "  =x"])
def test_backup_annotation_without_equals(shared: Shared, annotation: str) -> None:
    with writes_nothing(shared.cluster.repo):
        result = shared.cluster.pgvault("backup", "--annotate", annotation)
    assert_refused(result, 2, names=("--annotate", "is not KEY=VALUE"), fix=("--annotate reason=pre-upgrade",))


def test_info_of_an_unknown_backup(shared: Shared) -> None:
    with writes_nothing(shared.cluster.repo):
        result = shared.cluster.pgvault("info", "19990101T000000Z")
    assert_refused(result, 1, names=("19990101T000000Z", "no backup"), fix=("pgvault list",))


def test_an_unknown_command(shared: Shared) -> None:
    with writes_nothing(shared.cluster.repo):
        result = shared.cluster.pgvault("bakup")
    assert_refused(result, 2, names=("bakup",), fix=("--help",))


# ---- S3: the policy's s3 settings (exit 2, or 255 from wal-fetch) -----------------------------------

# Credentials moto accepts like any other; none of them may ever be printed (guarantee 10).
POLICY_SECRET = "pgvault/BadInput+Secret+7c2e91d04f"
POLICY_TOKEN = "pgvault-bad-input-session-token-5a81f3"
SECRETS = (POLICY_SECRET, POLICY_TOKEN, S3_ENV["AWS_SECRET_ACCESS_KEY"])
SEGMENT = "000000010000000000000001"


@pytest.fixture
def s3_shared(shared: Shared) -> Shared:
    """The shared cluster; tests using it are marked s3_only, so it is always the S3 run's."""
    assert shared.cluster.repo.kind == "s3"
    return shared


def s3_policy(shared: Shared, url: str | None = None, **s3: Any) -> dict[str, Any]:
    """The shared cluster's policy with credentials of its own, and s3 settings changed (None: removed)."""
    policy = base_policy(shared)
    section = policy["repository"]
    section["s3"].update(access_key_id="AKIAPGVAULTBADINPUT", secret_access_key=POLICY_SECRET,
                         session_token=POLICY_TOKEN)
    for key, value in s3.items():
        if value is None:
            section["s3"].pop(key, None)
        else:
            section["s3"][key] = value
    if url is not None:
        section["url"] = url
    return policy


def assert_no_secret(result: Result, *more: str) -> None:
    for secret in (*SECRETS, *more):
        assert secret not in result.out, f"a secret was printed:\n{result.out}"


def run_command(command: str, config: Path, workdir: Path) -> Result:
    if command == "wal-fetch":
        return run_pgvault("wal-fetch", SEGMENT, str(workdir / "RECOVERYXLOG"), config=config)
    return run_pgvault(command, config=config)


def exit_code(command: str, code: int) -> int:
    # Not 2 nor 1 from wal-fetch: restore_command's exit codes below 126 would end recovery early.
    return WAL_FETCH_ERROR_EXIT if command == "wal-fetch" else code


@pytest.mark.parametrize("command", ["init", "wal-fetch"])
@pytest.mark.parametrize(("url", "s3", "names", "fix"), [
    pytest.param("s3://Bad_Bucket/x", {}, ("repository.url", "'Bad_Bucket' is not a valid bucket name"),
                 ("s3://bucket/prefix",), id="bucket-name"),
    pytest.param("s3://", {}, ("repository.url", "bucket"), ("s3://bucket/prefix",), id="no-bucket"),
    pytest.param("s3:///backups", {}, ("repository.url", "bucket"), ("s3://bucket/prefix",), id="three-slashes"),
    pytest.param(None, {"secret_access_key": None}, ("repository.s3", "access_key_id", "secret_access_key"),
                 ("set both",), id="key-without-secret"),
    pytest.param(None, {"sse_kms_key_id": "arn:aws:kms:us-east-1:111122223333:key/pgvault"},
                 ("repository.s3", "sse_kms_key_id"), ("sse: aws:kms",), id="kms-key-without-kms"),
    pytest.param(None, {"endpoint_url": "ftp://x"}, ("repository.s3.endpoint_url", "'ftp://x'", "http(s)"),
                 ("https://",), id="endpoint-scheme"),
    # S3's smallest part (but the last) is 5 MiB: "at least 5242880" or "at least 5MiB".
    pytest.param(None, {"multipart_chunk_size": "1MiB"}, ("repository.s3.multipart_chunk_size must be at least 5",),
                 (), id="chunk-size"),
    pytest.param(None, {"secret_key": POLICY_SECRET}, ("unknown key repository.s3.secret_key",),
                 ("check its spelling",), id="unknown-key"),
    pytest.param(None, {"read_timeout": "0s"}, ("repository.s3", "read_timeout", "at least 1s"), (),
                 id="read-timeout"),
    pytest.param(None, {"storage_class": "COLD"}, ("repository.s3.storage_class", "'COLD'"), ("STANDARD_IA",),
                 id="storage-class"),
    pytest.param(None, {"retry_window": "forever"}, ("repository.s3.retry_window", "not a duration"), ("90s",),
                 id="retry-window"),
    pytest.param(None, {"region": "not a region!"}, ("repository.s3", "region", "'not a region!'"), (),
                 id="region"),
    pytest.param(None, {"profile": "no-such-profile"}, ("repository.s3.profile", "'no-such-profile'"),
                 ("fix the name",), id="profile"),
])
@pytest.mark.s3_only
def test_a_bad_s3_setting_is_named(s3_shared: Shared, workdir: Path, command: str, url: str | None,
                                   s3: dict[str, Any], names: tuple[str, ...], fix: tuple[str, ...]) -> None:
    config = write_config(workdir / "p.yaml", dump(s3_policy(s3_shared, url, **s3)))
    with writes_nothing(s3_shared.cluster.repo, workdir):
        result = run_command(command, config, workdir)
    assert_refused(result, exit_code(command, 2), names=names, fix=fix)
    assert_no_secret(result)


@pytest.mark.s3_only
def test_an_s3_section_under_a_file_url(s3_shared: Shared, workdir: Path) -> None:
    directory = workdir / "repo"
    config = write_config(workdir / "p.yaml", dump(s3_policy(s3_shared, f"file://{directory}")))
    with writes_nothing(s3_shared.cluster.repo, directory):
        result = run_pgvault("init", config=config)
    assert_refused(result, 2, names=("repository", "s3 section applies only to s3:// urls"), fix=("remove it",))
    assert_no_secret(result)


@pytest.mark.s3_only
@pytest.mark.parametrize("field", ["secret_access_key", "session_token"])
def test_a_secret_that_yaml_reads_as_a_number_is_not_echoed(s3_shared: Shared, workdir: Path, field: str) -> None:
    secret = 73194655218807
    config = write_config(workdir / "p.yaml", dump(s3_policy(s3_shared, **{field: secret})))
    with writes_nothing(s3_shared.cluster.repo, workdir):
        result = run_pgvault("init", config=config)
    assert_refused(result, 2, names=(f"repository.s3.{field}", "must be text"), fix=("quote it",))
    assert_no_secret(result, str(secret))


@pytest.mark.s3_only
def test_a_missing_ca_bundle_is_a_config_error(s3_shared: Shared, workdir: Path) -> None:
    bundle = workdir / "no-such-ca.pem"
    policy = s3_policy(s3_shared, endpoint_url=f"https://127.0.0.1:{moto().port}", ca_bundle=str(bundle))
    config = write_config(workdir / "p.yaml", dump(policy))
    with writes_nothing(s3_shared.cluster.repo, workdir):
        result = run_pgvault("init", config=config)
    assert_refused(result, 2, names=("repository.s3.ca_bundle", str(bundle), "does not exist"))
    assert_no_secret(result)


# ---- S3: the repository cannot be reached (exit 1, or 255 from wal-fetch) ---------------------------

def bucket_names() -> list[str]:
    return sorted(bucket["Name"] for bucket in moto().client().list_buckets()["Buckets"])


@pytest.mark.s3_only
@pytest.mark.parametrize("command", ["init", "backup", "info", "wal-fetch"])
def test_a_bucket_that_does_not_exist(s3_shared: Shared, workdir: Path, command: str) -> None:
    bucket = f"pgvault-missing-{os.getpid()}"
    config = write_config(workdir / "p.yaml", dump(s3_policy(s3_shared, f"s3://{bucket}/repo")))
    buckets = bucket_names()
    with writes_nothing(s3_shared.cluster.repo, workdir):
        result = run_command(command, config, workdir)
    assert bucket_names() == buckets, "a refused command created a bucket"
    assert_refused(result, exit_code(command, 1), names=(f"bucket '{bucket}'", "does not exist"),
                   fix=("repository.url",))
    assert_no_secret(result)


@pytest.mark.s3_only
@pytest.mark.parametrize("command", ["init", "info", "wal-fetch"])
def test_an_endpoint_nobody_listens_on(s3_shared: Shared, workdir: Path, command: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    policy = s3_policy(s3_shared, endpoint_url=endpoint, retries=1, retry_window="2s", connect_timeout="1s")
    config = write_config(workdir / "p.yaml", dump(policy))
    started = time.monotonic()
    with writes_nothing(s3_shared.cluster.repo, workdir):
        result = run_command(command, config, workdir)
    took = time.monotonic() - started
    error = assert_refused(result, exit_code(command, 1), fix=("endpoint_url",))
    assert took < 10, f"gave up only after {took:.1f} s with retries: 1, retry_window: 2s"
    # Which endpoint: it may come from the policy, AWS_ENDPOINT_URL or the AWS config files.
    assert endpoint.removeprefix("http://") in error, f"the endpoint is not named in {error!r}"
    assert_no_secret(result)
