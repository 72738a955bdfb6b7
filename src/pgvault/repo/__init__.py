"""Repository storage: the protocol, its backends, and the one place they are composed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgvault.config import RepositoryConfig
    from pgvault.repo.base import Storage
    from pgvault.repo.lock import FileLock


def open_storage(config: RepositoryConfig) -> Storage:
    from pgvault.repo.file import FileStorage

    return FileStorage(config.path)


def job_lock(config: RepositoryConfig, cluster: str, job: str) -> FileLock:
    """The lock for one kind of job on one cluster's repository area."""
    from pgvault.repo.lock import FileLock

    return FileLock(config.path / cluster / "locks" / f"{job}.lock", what=f"{job} of cluster {cluster!r}")
