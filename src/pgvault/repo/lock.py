"""One job at a time: locks a killed process cannot leave stuck.

FileLock (a local directory): the kernel drops an flock when its holder dies, however it dies
(SIGKILL included), so there is no stale-lock guessing; the file's content only feeds the error
message. LeaseLock (object storage, which has no locks): an object created with a no-overwrite
put, renewed while held, and taken over when it is stale: expired, or held by a process of this
host that no longer exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pgvault.errors import LockedError, ObjectExists, ObjectNotFound, PgvaultError, RepositoryError
from pgvault.repo.base import Storage

log = logging.getLogger("pgvault.lock")


class FileLock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RepositoryError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
                holder = f" (pid {info.get('pid')} on {info.get('host')}, since {started})"
            except (ValueError, OSError):
                pass
            os.close(fd)
            raise LockedError(
                f"another {self.what} is running{holder}; wait for it to finish",
                hint=f"the lock is {self.path}; it is released when that process exits",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": int(time.time())}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _alive(pid: object) -> bool:
    """Whether a process of this host still runs; a zombie (killed, not yet reaped) does not."""
    try:
        number = int(pid)  # type: ignore[call-overload]
        os.kill(number, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # cannot tell: treat as held, the lease expiry settles it
    try:
        stat = Path(f"/proc/{number}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _held_since(info: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, since {started}"


class LeaseLock:
    """A lease in the repository: {token, pid, host, since, expires}, renewed every ttl/4."""

    def __init__(self, storage: Storage, key: str, what: str, ttl: float = 120.0) -> None:
        self.storage = storage
        self.key = key
        self.what = what
        self.ttl = ttl
        self.token = secrets.token_hex(8)
        self._since = int(time.time())
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> io.BytesIO:
        return io.BytesIO(json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                                      "since": self._since, "expires": time.time() + self.ttl}).encode())

    def _holder(self) -> dict[str, Any] | None:
        try:
            handle, _meta = self.storage.open(self.key)
        except ObjectNotFound:
            return None
        with handle:
            try:
                info = json.loads(handle.read())
            except ValueError:
                return {}  # unreadable: treated as stale below
        return info if isinstance(info, dict) else {}

    @staticmethod
    def _stale(info: dict[str, Any]) -> bool:
        if not info or float(info.get("expires", 0)) < time.time():
            return True
        if info.get("host") == socket.gethostname():
            return not _alive(info.get("pid"))  # its holder died on this very host
        return False

    def __enter__(self) -> LeaseLock:
        for _ in range(2):
            try:
                self.storage.put(self.key, self._body())
                break
            except ObjectExists:
                info = self._holder()
                if info is None:
                    continue  # released between our put and our read: try again
                if not self._stale(info):
                    raise LockedError(f"another {self.what} is running ({_held_since(info)}); wait for it to "
                                      "finish", hint=f"the lease {self.key} in the repository expires "
                                      f"{int(self.ttl)} s after its holder stops renewing it") from None
                log.warning("taking over the stale lock of %s (%s)", self.what, _held_since(info))
                self.storage.delete([self.key])
        else:
            raise LockedError(f"another {self.what} took the lock at the same moment; try again")
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.storage.put(self.key, self._body(), overwrite=True)
            except PgvaultError as exc:
                log.warning("cannot renew the lock of %s: %s", self.what, exc.message)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(PgvaultError):
            info = self._holder()
            if info is not None and info.get("token") == self.token:
                self.storage.delete([self.key])
