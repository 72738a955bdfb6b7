"""The S3 backend by itself against moto_server through the fault proxy: every request of every
operation may fail, and each operation still returns exactly the right bytes and metadata."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
from conftest import moto
from faultproxy import FaultProxy
from repos import S3Repo

from pgvault.config import S3Config
from pgvault.errors import ObjectExists
from pgvault.repo.s3 import S3Storage

pytestmark = [pytest.mark.integration]


@pytest.fixture
def flaky() -> Iterator[tuple[S3Storage, FaultProxy]]:
    repo = S3Repo(moto())
    with FaultProxy(moto().port, seed=7) as proxy:
        config = S3Config(endpoint_url=proxy.url, multipart_chunk_size="5MiB", connect_timeout="1s",
                          read_timeout="2s", retries=30, retry_window="60s")
        storage = S3Storage(config, repo.bucket, "repo")
        storage.retry.base_delay = storage.retry.throttle_delay = 0.01  # fast retries: faults are frequent here
        yield storage, proxy


def test_every_operation_survives_half_of_its_requests_failing(flaky: tuple[S3Storage, FaultProxy]) -> None:
    storage, proxy = flaky
    small = os.urandom(300_000)
    large = os.urandom(12 * 1024 * 1024)  # three chunks: a multipart upload with a sidecar
    proxy.set_faults(0.5, ("500", "reset", "truncate", "reset-after"))
    for round_ in range(3):
        small_meta = storage.put(f"c/small-{round_}", io.BytesIO(small), extra={"raw_sha256": "s"})
        large_meta = storage.put(f"c/large-{round_}", io.BytesIO(large), extra={"raw_sha256": "l"})
        for key, data, meta in ((f"c/small-{round_}", small, small_meta), (f"c/large-{round_}", large, large_meta)):
            assert storage.head(key) == meta
            handle, opened = storage.open(key)
            with handle:
                assert handle.read() == data
            assert opened == meta and meta.extra == {"raw_sha256": "s" if data is small else "l"}
        with pytest.raises(ObjectExists):
            storage.put(f"c/small-{round_}", io.BytesIO(b"other content"))
    assert sorted(o.key for o in storage.list("c/")) == sorted(f"c/{k}-{r}" for k in ("large", "small")
                                                                for r in range(3))
    storage.delete([o.key for o in storage.list("c/")])
    assert list(storage.list("c/")) == []
    stats = proxy.stats
    assert stats["truncate"] > 0 and stats["reset-after"] > 0 and stats["faults"] >= stats["requests"] // 3, stats
