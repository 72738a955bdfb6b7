"""The exception hierarchy. Each class carries the exit code the CLI returns for it.

Exit codes: 2 for usage and configuration errors (the command line or policy file must change),
1 for operations that failed (the repository, the server or the target is the problem).
"""

from __future__ import annotations


class PgvaultError(Exception):
    """Base of every error pgvault reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(PgvaultError):
    """A flag or argument is wrong; the command line must change."""

    exit_code = 2


class ConfigError(UsageError):
    """The policy file is missing, unreadable or invalid."""


class RepositoryError(PgvaultError):
    """The repository cannot be read or written, or is not what it should be."""


class TransientError(RepositoryError):
    """A request failed in a way worth retrying: 5xx, throttling, a timeout, a reset connection."""


class ObjectNotFound(RepositoryError):
    """A key the caller asked for is not in the repository."""


class ObjectExists(RepositoryError):
    """A no-overwrite put found the key already there."""


class IntegrityError(RepositoryError):
    """A stored object does not match its recorded checksum or size."""


class ConflictError(RepositoryError):
    """Different content was offered for a name that is already archived."""


class LockedError(PgvaultError):
    """Another pgvault process holds the lock for this job."""


class PostgresError(PgvaultError):
    """The PostgreSQL server, or one of its tools, failed or refused."""


class TargetUnreachable(PgvaultError):
    """The repository cannot recover to the requested target."""


class UnsafeArchive(IntegrityError):
    """A backup member would be written outside the target directory."""


class DataDirectoryInUse(PgvaultError):
    """The restore target directory is not empty or a postmaster owns it."""
