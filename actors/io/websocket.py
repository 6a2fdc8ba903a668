"""The portal websocket: websocket-client in a reader thread that reports to a listener.

Connecting and reading block, so both happen in a thread named ``PortalReader``; the
actor only calls :meth:`WebSocketClientConn.send` (thread-safe in websocket-client) and
:meth:`WebSocketClientConn.close` (non-blocking). The reader reports exactly one of
``on_failed`` (the upgrade failed) or ``on_open`` followed by frames and one
``on_closed``; nothing after :meth:`close`.

The login URL carries the token: it is never logged here, error texts are passed through
:func:`redact` and a filter on the ``websocket`` logger scrubs websocket-client's own logs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any, Protocol

import websocket

from gateway.portal.login_url import LoginUrl

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
POLL_INTERVAL = 0.2  # how often the reader re-checks its stop flag

_URL_SECRET = re.compile(r"(token=)[^&\s'\"]+")
_JSON_SECRET = re.compile(r'("(?:preshared_key|password|token)"\s*:\s*)"(?:[^"\\]|\\.)*"')


def redact(text: str) -> str:
    """Scrub ``token=...`` URL parameters."""
    return _URL_SECRET.sub(r"\1<redacted>", text)


def redact_frame(text: str) -> str:
    """Scrub PSKs, TURN/ICE passwords and tokens from a JSON frame for the wire log."""
    return redact(_JSON_SECRET.sub(r'\1"<redacted>"', text))


class _RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not our problem; let logging report it
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger_name: str = "websocket") -> None:
    """Make sure a library logger (websocket-client's by default) cannot leak the token."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _RedactTokens) for f in logger.filters):
        logger.addFilter(_RedactTokens())


install_log_redaction()


class SocketListener(Protocol):
    """What the reader reports; the actor binds one per connection generation."""

    def on_open(self) -> None: ...

    def on_text(self, text: str) -> None: ...

    def on_closed(self, reason: str) -> None: ...

    def on_failed(self, http_status: int | None, reason: str) -> None: ...


class WebSocketConn(Protocol):
    """One portal socket as the actor sees it (tests substitute an in-memory fake)."""

    def send(self, text: str) -> None:
        """Write a text frame; raises on a dead socket."""
        ...

    def close(self) -> None:
        """Stop the reader and close the socket; idempotent and non-blocking."""
        ...


WebSocketFactory = Callable[[LoginUrl, str, SocketListener], WebSocketConn]


class WebSocketClientConn:
    """websocket-client connection driven by its own ``PortalReader`` thread."""

    def __init__(
        self,
        url: LoginUrl,
        user_agent: str,
        listener: SocketListener,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        sslopt: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(url, LoginUrl):
            raise TypeError("the portal socket needs a LoginUrl (with public key)")
        self._url = url
        self._user_agent = user_agent
        self._listener = listener
        self._connect_timeout = connect_timeout
        self._sslopt = sslopt
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        self._thread = threading.Thread(target=self._run, name="PortalReader", daemon=True)
        self._thread.start()

    def send(self, text: str) -> None:
        ws = self._ws
        if ws is None or self._stop.is_set():
            raise ConnectionError("portal socket is not open")
        ws.send(text)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            ws = self._ws
        if ws is not None:
            try:
                ws.send_close(websocket.STATUS_NORMAL)  # the reader shuts down on the echo
            except Exception as exc:  # already dead: the reader will notice
                log.debug("close frame not sent: %s", exc)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to finish (tests, shutdown)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            ws = websocket.create_connection(
                self._url.url,
                header={"User-Agent": self._user_agent},
                timeout=self._connect_timeout,
                sslopt=self._sslopt,
                enable_multithread=True,
                suppress_origin=True,  # the gateway sends no Origin (§2)
            )
        except websocket.WebSocketBadStatusException as exc:
            body = exc.resp_body.decode("utf-8", "replace") if exc.resp_body else ""
            self._report_failed(exc.status_code, redact(body.strip()[:200]))
            return
        except Exception as exc:  # TCP, TLS, DNS, handshake errors: all transient
            self._report_failed(None, redact(f"{type(exc).__name__}: {exc}"))
            return
        with self._lock:
            self._ws = ws
        if self._stop.is_set():
            self._shutdown(ws, clean=True)
            return
        self._listener.on_open()
        reason = self._read(ws)
        if not self._stop.is_set():
            self._listener.on_closed(reason)

    def _read(self, ws: websocket.WebSocket) -> str:
        ws.settimeout(POLL_INTERVAL)
        while True:
            if self._stop.is_set():
                self._await_close_echo(ws)
                return "closed locally"
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                self._shutdown(ws, clean=False)
                return "connection closed"
            except Exception as exc:
                self._shutdown(ws, clean=False)
                return redact(f"{type(exc).__name__}: {exc}")
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._shutdown(ws, clean=False)  # websocket-client already echoed the close
                return "server closed the websocket"
            if opcode == websocket.ABNF.OPCODE_TEXT:
                if not self._stop.is_set():
                    self._listener.on_text(data.decode("utf-8", "replace"))
            else:
                log.debug("Received non-text message from portal (opcode %d)", opcode)

    def _await_close_echo(self, ws: websocket.WebSocket) -> None:
        """close() already sent our close frame; give the server 1 s to echo it."""
        ws.settimeout(1.0)
        try:
            while ws.recv_data()[0] != websocket.ABNF.OPCODE_CLOSE:
                pass
        except Exception as exc:  # timeout or the server just dropped the TCP connection
            log.debug("no close echo from portal: %s", exc)
        ws.shutdown()

    def _shutdown(self, ws: websocket.WebSocket, *, clean: bool) -> None:
        try:
            if clean:
                ws.close(status=websocket.STATUS_NORMAL, timeout=1)
            else:
                ws.shutdown()
        except Exception as exc:
            log.debug("websocket close: %s", exc)
            ws.shutdown()

    def _report_failed(self, status: int | None, reason: str) -> None:
        if not self._stop.is_set():
            self._listener.on_failed(status, reason)


def connect_websocket(url: LoginUrl, user_agent: str, listener: SocketListener) -> WebSocketConn:
    """The production :data:`WebSocketFactory`."""
    return WebSocketClientConn(url, user_agent, listener)
