"""Retrying storage requests: backoff with jitter within a budget of tries and time.

Object stores fail transiently (5xx, SlowDown, resets, timeouts) and a retry is the fix; a retry
must also end, because `archive_command` blocked on a hung endpoint stalls PostgreSQL's archiver
(the most common complaint against WAL-G). Retries apply per request, not per operation: a
multipart upload retries the one chunk that failed, and a read resumes where it broke off, which
a wrapper around whole operations cannot do with a stream it cannot rewind.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pgvault.errors import RepositoryError, TransientError

T = TypeVar("T")
log = logging.getLogger("pgvault.repo")


class Throttled(TransientError):
    """The store asked us to slow down (503 SlowDown, 429): back off longer."""


@dataclass
class RetryPolicy:
    retries: int = 6
    window: float = 60.0  # no try starts later than this many seconds after the first
    base_delay: float = 0.1
    throttle_delay: float = 1.0
    max_delay: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, throttled: bool) -> float:
        """Exponential backoff with 'equal jitter': at least half the step, never the same for two callers."""
        step = min(self.max_delay, (self.throttle_delay if throttled else self.base_delay) * 2 ** (attempt - 1))
        return step / 2 + self.rng.uniform(0, step / 2)

    def call(self, fn: Callable[[], T], what: str) -> T:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except TransientError as exc:
                elapsed = time.monotonic() - started
                pause = self.delay(attempt, isinstance(exc, Throttled))
                if attempt > self.retries or elapsed + pause > self.window:
                    raise RepositoryError(
                        f"{what} failed after {attempt} tr{'y' if attempt == 1 else 'ies'} in {elapsed:.1f} s: "
                        f"{exc.message}",
                        hint=exc.hint or "the object store is failing; pgvault gave up so the caller can retry "
                        "later (PostgreSQL keeps WAL and retries archive_command)",
                    ) from None
                log.info("%s: %s; retrying in %.2f s (try %d of %d)", what, exc.message, pause, attempt + 1,
                         self.retries + 1)
                self.sleep(pause)
