"""Repository storage: the protocol, its backends, and the one place they are composed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from pgvault.config import RepositoryConfig
    from pgvault.repo.base import Storage


def open_storage(config: RepositoryConfig) -> Storage:
    if config.kind == "s3":
        from pgvault.config import S3Config
        from pgvault.repo.s3 import S3Storage

        return S3Storage(config.s3 or S3Config(), config.bucket, config.prefix)
    from pgvault.repo.file import FileStorage

    return FileStorage(config.path)


def job_lock(config: RepositoryConfig, storage: Storage, cluster: str, job: str) -> AbstractContextManager[object]:
    """The lock for one kind of job on one cluster's repository area.

    A local directory gets an flock (the kernel frees it when the holder dies); object storage
    has no such thing and gets a lease object, renewed while held and taken over once stale.
    """
    what = f"{job} of cluster {cluster!r}"
    if config.kind == "s3":
        from pgvault.repo.lock import LeaseLock

        return LeaseLock(storage, f"{cluster}/locks/{job}.lock", what=what)
    from pgvault.repo.lock import FileLock

    return FileLock(config.path / cluster / "locks" / f"{job}.lock", what=what)
