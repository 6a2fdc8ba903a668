"""HTTP health endpoint: ``/healthz`` (alive), ``/readyz`` (joined to the portal), ``/metrics``.

Each answers GET and HEAD; other methods get 405, other paths 404
(rust/bin-shared/src/http_health_check.rs). Runs on its own named thread, independent of the portal
connection, like the real gateway's. A bind failure is logged and the gateway carries on without it.

The port is often reachable by more than the orchestrator that probes it, so what a
connection can hold is bounded: a thread per connection, at most ``max_connections``
(16) of them; a request (line and headers, at most ``MAX_REQUEST_BYTES``) must arrive
within ``read_timeout`` (10 s) of the connection starting to wait for it, idle keep-alive
connections included, or the connection is closed. When every slot is taken, the
connection that has waited longest without sending anything is closed for the new one,
so idle connections cannot keep a probe out; if none is idle, the new one is closed.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from actors.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger(__name__)


#: Connections served at once (a thread each).
MAX_CONNECTIONS = 16
#: Seconds a connection may take to send a whole request (or wait idle for the next).
READ_TIMEOUT = 10.0
#: Request line and headers together.
MAX_REQUEST_BYTES = 8192


class _Conn:
    """One accepted connection: its socket and whether it has sent part of a request."""

    __slots__ = ("idle", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    max_connections = MAX_CONNECTIONS
    read_timeout = READ_TIMEOUT
    #: The kernel's queue of connections not yet accepted (socketserver's default, 5,
    #: makes a burst of connections wait for SYN retransmits).
    request_queue_size = 64

    def server_activate(self) -> None:
        super().server_activate()
        self.conns_lock = threading.Lock()
        #: every connection with a thread, oldest first, and the ones being closed for room
        self.conns: OrderedDict[socket.socket, _Conn] = OrderedDict()
        self.evicting: set[socket.socket] = set()
        self.refused = 0
        self.evicted = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            live = len(self.conns) - len(self.evicting)
            if live >= self.max_connections:
                victim = next(
                    (c for sock, c in self.conns.items()
                     if c.idle and sock not in self.evicting), None,
                )
                if victim is None or len(self.conns) >= 2 * self.max_connections:
                    self.refused += 1
                    self.shutdown_request(request)
                    return
                self.evicting.add(victim.sock)
                self.evicted += 1
                with contextlib.suppress(OSError):
                    victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and ends
            self.conns[request] = _Conn(request)
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.pop(request, None)
            self.evicting.discard(request)

    def connection_of(self, sock: socket.socket) -> _Conn | None:
        with self.conns_lock:
            return self.conns.get(sock)

    def connection_count(self) -> int:
        with self.conns_lock:
            return len(self.conns)

    def close_connections(self) -> None:
        """Wake every handler thread (at stop) so none outlives the server."""
        with self.conns_lock:
            socks = list(self.conns)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each given only what is left of the request's time, and
    at most what is left of its size: a request trickled a byte at a time cannot hold
    its thread past the deadline (a plain socket timeout restarts with every byte)."""

    def __init__(self, sock: socket.socket, conn: _Conn | None, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._conn = conn
        self._timeout = timeout
        self.deadline = 0.0
        self.remaining = 0

    def start_request(self) -> None:
        self.deadline = time.monotonic() + self._timeout
        self.remaining = MAX_REQUEST_BYTES
        if self._conn is not None:
            self._conn.idle = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        if self.remaining <= 0:
            raise http.client.LineTooLong(f"request larger than {MAX_REQUEST_BYTES} bytes")
        self._sock.settimeout(left)
        view = memoryview(buffer)[: self.remaining]
        count = self._sock.recv_into(view)
        self.remaining -= count
        if count and self._conn is not None:
            self._conn.idle = False
        return count


def _server_class(host: str) -> type[_Server]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("_HealthServer", (_Server,), {"address_family": family})


class HealthServer:
    """Serves the three endpoints on ``addr`` (port 0 picks a free port, see ``.address``)."""

    def __init__(
        self,
        addr: tuple[str, int],
        is_ready: Callable[[], bool],
        metrics: Callable[[], str],
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self._addr = addr
        self._is_ready = is_ready
        self._metrics = metrics
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def connections(self) -> int:
        """Connections holding a thread now (for tests and status)."""
        return self._server.connection_count() if self._server is not None else 0

    def refused(self) -> int:
        """Connections closed at once because every slot was busy with a request."""
        return self._server.refused if self._server is not None else 0

    def evicted(self) -> int:
        """Idle connections closed to make room for a new one."""
        return self._server.evicted if self._server is not None else 0

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (host, port), or None when not serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve; on failure log and return (the gateway runs without it)."""
        handler = _make_handler(self._is_ready, self._metrics)
        try:
            server = _server_class(self._addr[0])(self._addr, handler)
        except OSError as exc:
            log.error(
                "health check server cannot listen on %s:%d: %s",
                self._addr[0],
                self._addr[1],
                exc.strerror or exc,
            )
            return
        server.max_connections = self._max_connections
        server.read_timeout = self._read_timeout
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="HealthServer"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("health check server listening on %s:%d", *self.address or ("?", 0))

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or after a failed start."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        # shutdown() waits for the serve loop's next poll; poke it awake with a connection
        # instead of waiting out the poll interval.
        stopper = threading.Thread(target=server.shutdown, name="HealthServer-stop")
        stopper.start()
        while stopper.is_alive():
            _poke(server)
            stopper.join(timeout=0.05)
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _poke(server: _Server) -> None:
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(str(host), str(host))
    with contextlib.suppress(OSError):
        socket.create_connection((host, int(port)), timeout=0.2).close()


#: Every path we serve. Like the reference's axum router (``get(...)`` per route): GET and
#: HEAD (the same answer without a body) on these, 405 for other methods, 404 elsewhere
#: whatever the method.
PATHS = ("/healthz", "/readyz", "/metrics")
ALLOW = "GET, HEAD"


def _make_handler(
    is_ready: Callable[[], bool], metrics: Callable[[], str]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "firezone-gateway"
        sys_version = ""
        server: _Server

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket's own reader: replaced, and it holds the fd
            sock = self.connection
            self._reader = _DeadlineReader(
                sock, self.server.connection_of(sock), self.server.read_timeout
            )
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            self._reader.start_request()
            try:
                super().handle_one_request()
            except http.client.LineTooLong:  # the request line alone was too long
                self.close_connection = True
                self.requestline, self.request_version = "", "HTTP/1.1"
                self.command = "GET"
                self._reply(414, b"request too large\n")

        def _path(self) -> str:
            return self.path.split("?", 1)[0]

        def do_GET(self) -> None:
            path = self._path()
            if path == "/healthz":
                self._reply(200, b"")
            elif path == "/readyz":
                ready = _safe(is_ready, False)
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            elif path == "/metrics":
                try:
                    body = metrics().encode()
                except Exception:
                    log.exception("rendering metrics failed")
                    self._reply(500, b"metrics unavailable\n")
                    return
                self._reply(200, body, METRICS_CONTENT_TYPE)
            else:
                self._reply(404, b"not found\n")

        # HEAD is GET without the body (``_reply`` leaves it out), headers included.
        do_HEAD = do_GET

        def _other_method(self) -> None:
            # The request body is never read: close the connection rather than parse it
            # as the next request.
            self.close_connection = True
            if self._path() in PATHS:
                self._reply(405, b"method not allowed\n", extra={"Allow": ALLOW})
            else:
                self._reply(404, b"not found\n")

        def __getattr__(self, name: str) -> Any:
            # Every other method (do_POST, do_PUT, do_BREW, ...): 405 or 404 by path.
            if name.startswith("do_"):
                return self._other_method
            raise AttributeError(name)

        def _reply(
            self,
            status: int,
            body: bytes,
            content_type: str = "text/plain; charset=utf-8",
            extra: dict[str, str] | None = None,
        ) -> None:
            # The reads left the socket with what remained of the request's deadline.
            self.connection.settimeout(self.server.read_timeout)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def _safe(predicate: Callable[[], bool], fallback: bool) -> bool:
    try:
        return bool(predicate())
    except Exception:
        log.exception("readiness check failed")
        return fallback
