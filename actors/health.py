"""HTTP health endpoint: ``/healthz`` (alive), ``/readyz`` (joined to the portal), ``/metrics``.

Each answers GET and HEAD; other methods get 405, other paths 404 (operations.md §3).
Runs on its own named thread, independent of the portal connection, like the real
gateway's. A bind failure is logged and the gateway carries on without it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from actors.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


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
    ) -> None:
        self._addr = addr
        self._is_ready = is_ready
        self._metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

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
