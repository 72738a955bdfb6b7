"""The retry policy's budget and backoff, and the lease lock on a storage (a directory here)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgvault.errors import LockedError, RepositoryError, TransientError
from pgvault.repo.file import FileStorage
from pgvault.repo.lock import LeaseLock
from pgvault.repo.retry import RetryPolicy, Throttled


def _policy(**kwargs: object) -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []
    return RetryPolicy(sleep=slept.append, rng=random.Random(1), **kwargs), slept  # type: ignore[arg-type]


def test_a_transient_failure_is_retried_until_it_succeeds() -> None:
    policy, slept = _policy(retries=5)
    answers = iter([TransientError("reset"), TransientError("500"), "ok"])

    def call() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert policy.call(call, "S3 PutObject k") == "ok"
    assert len(slept) == 2 and slept[0] < slept[1]


def test_the_budget_of_tries_ends_with_one_clear_error() -> None:
    policy, slept = _policy(retries=3)
    tries = []

    def call() -> None:
        tries.append(1)
        raise TransientError("the store answered 500 InternalError")

    with pytest.raises(RepositoryError) as caught:
        policy.call(call, "S3 GetObject k")
    assert len(tries) == 4 and len(slept) == 3
    assert not isinstance(caught.value, TransientError)  # no outer layer retries it again
    assert caught.value.message == ("S3 GetObject k failed after 4 tries in 0.0 s: the store answered 500 "
                                    "InternalError")


def test_no_try_starts_after_the_window() -> None:
    policy = RetryPolicy(retries=1000, window=0.5, base_delay=0.05, max_delay=0.1)
    started = time.monotonic()
    with pytest.raises(RepositoryError):
        policy.call(lambda: (_ for _ in ()).throw(TransientError("reset")), "x")
    assert time.monotonic() - started < 0.7


def test_errors_that_are_not_transient_are_not_retried() -> None:
    policy, slept = _policy()
    with pytest.raises(RepositoryError, match="denied"):
        policy.call(lambda: (_ for _ in ()).throw(RepositoryError("access denied")), "x")
    assert slept == []


@given(attempt=st.integers(1, 30), throttled=st.booleans(), seed=st.integers(0, 2**32))
def test_backoff_is_jittered_within_its_step(attempt: int, throttled: bool, seed: int) -> None:
    policy = RetryPolicy(rng=random.Random(seed))
    step = min(policy.max_delay, (policy.throttle_delay if throttled else policy.base_delay) * 2 ** (attempt - 1))
    assert step / 2 <= policy.delay(attempt, throttled) <= step


def test_throttling_backs_off_longer_than_errors() -> None:
    policy = RetryPolicy(rng=random.Random(3))
    assert policy.delay(1, True) >= policy.delay(1, False) * 4
    assert isinstance(Throttled("SlowDown"), TransientError)


# ---- the lease lock -------------------------------------------------------------------------------------

@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path)


def test_a_held_lease_refuses_a_second_holder_and_is_released(storage: FileStorage) -> None:
    second = LeaseLock(storage, "c/locks/backup.lock", what="backup of cluster 'c'")
    with (LeaseLock(storage, "c/locks/backup.lock", what="backup of cluster 'c'"),
          pytest.raises(LockedError, match=r"another backup of cluster 'c' is running \(pid \d+ on ")):
        second.__enter__()
    assert storage.head("c/locks/backup.lock") is None
    with LeaseLock(storage, "c/locks/backup.lock", what="backup"):
        pass


def _plant(storage: FileStorage, **holder: object) -> None:
    import io

    storage.put("c/locks/backup.lock", io.BytesIO(json.dumps(holder).encode()))


def test_a_lease_whose_holder_died_on_this_host_is_taken_over(storage: FileStorage) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(storage, token="old", pid=dead.pid, host=socket.gethostname(), since=0, expires=time.time() + 3600)
    with LeaseLock(storage, "c/locks/backup.lock", what="backup") as lock:
        assert json.loads(storage.open("c/locks/backup.lock")[0].read())["token"] == lock.token


def test_a_lease_whose_holder_is_a_zombie_is_taken_over(storage: FileStorage) -> None:
    # Killed but not yet reaped (its parent died with it; init reaps it a moment later).
    child = subprocess.Popen(["sleep", "60"])
    child.kill()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _plant(storage, token="old", pid=child.pid, host=socket.gethostname(), since=0, expires=time.time() + 3600)
    try:
        with LeaseLock(storage, "c/locks/backup.lock", what="backup"):
            pass
    finally:
        child.wait()


def test_an_expired_lease_of_another_host_is_taken_over_and_a_live_one_is_not(storage: FileStorage) -> None:
    _plant(storage, token="old", pid=1, host="elsewhere", since=0, expires=time.time() - 1)
    with LeaseLock(storage, "c/locks/backup.lock", what="backup"):
        pass
    _plant(storage, token="live", pid=1, host="elsewhere", since=0, expires=time.time() + 60)
    with pytest.raises(LockedError):
        LeaseLock(storage, "c/locks/backup.lock", what="backup").__enter__()
    assert json.loads(storage.open("c/locks/backup.lock")[0].read())["token"] == "live"


def test_a_held_lease_is_renewed(storage: FileStorage) -> None:
    with LeaseLock(storage, "c/locks/backup.lock", what="backup", ttl=0.4):
        first = json.loads(storage.open("c/locks/backup.lock")[0].read())["expires"]
        time.sleep(0.5)
        later = json.loads(storage.open("c/locks/backup.lock")[0].read())["expires"]
        assert later > first
