"""A fault-injecting HTTP proxy for tests: it sits between pgvault's boto3 S3 client and a moto_server.

Why it exists: moto answers every request correctly, so it cannot show what the S3 backend does when the
network or the service misbehaves. This proxy forwards requests to moto and, for a chosen fraction of them,
answers instead with what a real endpoint sometimes does: a 503 SlowDown, a 500 InternalError, a reset
connection, a hang, a body cut off mid-stream, or a reset after the request took effect upstream (a lost
acknowledgement). The fault mix can be changed at any time from the test thread.

    with FaultProxy(moto_port, seed=7) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, ...)
        proxy.set_faults(0.2, ("503", "reset"))
        ...
        proxy.outage(True)                     # every request is reset until outage(False)
        assert proxy.stats["faults"] > 0

Each client request is read in full (request line, headers, a Content-Length or chunked body, after a
`100 Continue` when asked), forwarded to upstream as a fresh request with http.client, and the upstream
response is relayed with a Content-Length. Client connections are kept alive between requests.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import logging
import random
import socket
import socketserver
import struct
import termios
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("503", "500", "reset", "stall", "truncate", "reset-after")

_ERROR_BODIES = {
    "503": b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    "500": b"<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again."
    b"</Message></Error>",
}
_REASONS = {"503": "Slow Down", "500": "Internal Server Error"}

# Headers that describe one connection, not the message: never forwarded in either direction.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
     "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)
_MAX_LINE = 65536
_MAX_HEADERS = 200
_IDLE_TIMEOUT = 60.0
_UPSTREAM_TIMEOUT = 60.0


class _BadRequest(Exception):
    """The client sent something this proxy cannot parse as an HTTP/1.x request."""


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    # True when `headers` already carry the right Content-Length for a message without a body (HEAD, 204, 304).
    bodiless: bool = False


@dataclass(frozen=True)
class _Faults:
    rate: float = 0.0
    kinds: tuple[str, ...] = ("500", "reset")
    stall_seconds: float = 5.0
    outage_kind: str | None = None


def _zero_stats() -> dict[str, int]:
    return {"requests": 0, "faults": 0, **dict.fromkeys(FAULT_KINDS, 0)}


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream_port` that injects faults at a seeded random rate."""

    def __init__(self, upstream_port: int, *, seed: int = 0, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._stats = _zero_stats()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free port on 127.0.0.1 and serve in background daemon threads."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        log.debug("faultproxy listening on %s, upstream %s:%d", self.url, self.upstream_host, self.upstream_port)
        return self

    def stop(self) -> None:
        """Stop accepting, end stalls, and close every open client connection. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- configuration (thread-safe, effective for the next request) --------------------------------------

    def set_faults(
        self, rate: float, kinds: tuple[str, ...] = ("500", "reset"), stall_seconds: float = 5.0
    ) -> None:
        """Fault a fraction `rate` (0..1) of requests, each with a kind picked at random from `kinds`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, not {rate!r}")
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("kinds must name at least one fault kind")
        for kind in kinds:
            _check_kind(kind)
        if stall_seconds < 0:
            raise ValueError(f"stall_seconds must not be negative, not {stall_seconds!r}")
        with self._lock:
            self._faults = _Faults(rate, kinds, stall_seconds, self._faults.outage_kind)

    def outage(self, on: bool, *, kind: str = "reset") -> None:
        """While on, every request gets a fault of `kind`, whatever set_faults said."""
        _check_kind(kind)
        with self._lock:
            f = self._faults
            self._faults = _Faults(f.rate, f.kinds, f.stall_seconds, kind if on else None)

    @property
    def stats(self) -> dict[str, int]:
        """A copy of the counters: `requests`, `faults`, and one count per fault kind."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = _zero_stats()

    # -- serving ----------------------------------------------------------------------------------------

    def _choose_fault(self) -> tuple[str | None, float]:
        """Count one request and decide its fate: a fault kind (or None to forward) and the stall length."""
        with self._lock:
            f = self._faults
            self._stats["requests"] += 1
            kind = f.outage_kind
            if kind is None and f.rate > 0 and self._rng.random() < f.rate:
                kind = self._rng.choice(f.kinds)
            if kind is not None:
                self._stats["faults"] += 1
                self._stats[kind] += 1
            return kind, f.stall_seconds

    def _serve_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.add(sock)
        sock.settimeout(_IDLE_TIMEOUT)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        try:
            while not self._stopping.is_set():
                try:
                    request = _read_request(rfile, sock)
                except _BadRequest as exc:
                    log.debug("faultproxy: bad request: %s", exc)
                    _send(sock, _plain_response(400, "Bad Request", str(exc).encode()), keep_alive=False)
                    return
                if request is None:
                    return
                if not self._handle(sock, rfile, request):
                    return
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.debug("faultproxy: client connection ended: %r", exc)
        finally:
            with self._lock:
                self._connections.discard(sock)
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                sock.close()

    def _handle(self, sock: socket.socket, rfile: BinaryIO, request: _Request) -> bool:
        """Answer one request, faulty or not. Returns whether the connection can serve another."""
        kind, stall_seconds = self._choose_fault()
        log.debug("faultproxy: %s %s -> %s", request.method, request.target, kind or "forward")
        if kind is None:
            _send(sock, self._forward(request), keep_alive=request.keep_alive, method=request.method)
            return request.keep_alive
        if kind in _ERROR_BODIES:
            response = _Response(int(kind), _REASONS[kind], [("Content-Type", "application/xml")], _ERROR_BODIES[kind])
            _send(sock, response, keep_alive=request.keep_alive, method=request.method)
            return request.keep_alive
        if kind == "stall":
            self._stopping.wait(stall_seconds)
            return False
        if kind == "reset":
            _reset(sock, rfile)
            return False
        response = self._forward(request)  # "reset-after" and "truncate": upstream did the work
        if kind == "truncate" and response.body and not response.bodiless:
            half = response.body[: len(response.body) // 2]
            sock.sendall(_head(response, keep_alive=True) + half)
            _wait_until_sent(sock, timeout=2.0)
        _reset(sock, rfile)
        return False

    def _forward(self, request: _Request) -> _Response:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=_UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if request.body or request.method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders(request.body or None)
            upstream = conn.getresponse()
            body = upstream.read()
            bodiless = request.method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200
            headers = [
                (name, value)
                for name, value in upstream.getheaders()
                if name.lower() not in _HOP_BY_HOP and (bodiless or name.lower() != "content-length")
            ]
            return _Response(upstream.status, upstream.reason, headers, body, bodiless)
        except (OSError, http.client.HTTPException) as exc:
            log.debug("faultproxy: upstream failed: %r", exc)
            return _plain_response(502, "Bad Gateway", f"upstream failed: {exc!r}".encode())
        finally:
            conn.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    proxy: FaultProxy

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("faultproxy: error serving %s", client_address, exc_info=True)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        # The connection is closed (or reset) by the handler; no SHUT_WR on a socket that may be gone.
        self.close_request(request)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.proxy._serve_connection(self.request)


def _check_kind(kind: str) -> None:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")


def _readline(rfile: BinaryIO) -> bytes:
    line = rfile.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise _BadRequest("line too long")
    return line


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise ConnectionError(f"client closed mid-body ({len(data)} of {size} bytes)")
    return data


def _read_chunked(rfile: BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        line = _readline(rfile)
        if not line:
            raise ConnectionError("client closed mid-chunk")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadRequest(f"bad chunk size line {line!r}") from None
        if size == 0:
            break
        parts.append(_read_exact(rfile, size))
        if _readline(rfile).strip():
            raise _BadRequest("chunk not followed by CRLF")
    while _readline(rfile).strip():  # trailer fields, up to the blank line: dropped
        pass
    return b"".join(parts)


def _read_request(rfile: BinaryIO, sock: socket.socket) -> _Request | None:
    """The next request on the connection, body included; None when the client closed it cleanly."""
    line = _readline(rfile)
    while line in (b"\r\n", b"\n"):  # tolerated between requests (RFC 9112 §2.2)
        line = _readline(rfile)
    if not line:
        return None
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise _BadRequest(f"bad request line {line!r}") from None
    if not version.startswith("HTTP/1."):
        raise _BadRequest(f"unsupported version {version!r}")
    headers: list[tuple[str, str]] = []
    while True:
        raw = _readline(rfile)
        if not raw:
            raise ConnectionError("client closed mid-headers")
        if raw in (b"\r\n", b"\n"):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise _BadRequest(f"bad header line {raw!r}")
        headers.append((name.strip(), value.strip()))
        if len(headers) > _MAX_HEADERS:
            raise _BadRequest("too many headers")
    fields = {name.lower(): value for name, value in headers}
    connection = {token.strip().lower() for token in fields.get("connection", "").split(",")}
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    if fields.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _read_chunked(rfile)
    elif "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            raise _BadRequest(f"bad Content-Length {fields['content-length']!r}") from None
        body = _read_exact(rfile, length)
    else:
        body = b""
    return _Request(method, target, headers, body, keep_alive)


def _plain_response(status: int, reason: str, body: bytes) -> _Response:
    return _Response(status, reason, [("Content-Type", "text/plain")], body)


def _head(response: _Response, *, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    if not response.bodiless:
        lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send(sock: socket.socket, response: _Response, *, keep_alive: bool, method: str = "GET") -> None:
    body = b"" if response.bodiless or method == "HEAD" else response.body
    sock.sendall(_head(response, keep_alive=keep_alive) + body)


def _reset(sock: socket.socket, rfile: BinaryIO) -> None:
    """Close with a TCP RST rather than a FIN: SO_LINGER on with a zero timeout, then close."""
    with contextlib.suppress(OSError):
        rfile.close()  # the makefile() holds a reference: the fd only closes once it is gone too
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _wait_until_sent(sock: socket.socket, timeout: float) -> None:
    """Wait until the kernel's send queue is empty (acknowledged by the peer), so a RST does not discard it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            (unsent,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))
        except OSError:
            time.sleep(0.05)
            return
        if unsent == 0:
            return
        time.sleep(0.005)
