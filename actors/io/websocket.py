"""The portal websocket: websocket-client in a reader thread that reports to a listener.

Connecting and reading block, so both happen in a thread named ``PortalReader``; the
actor only calls :meth:`WebSocketClientConn.send` (thread-safe in websocket-client),
:meth:`~WebSocketClientConn.abort` and :meth:`~WebSocketClientConn.close` (both
non-blocking). The reader reports exactly one of ``on_failed`` (the attempt failed) or
``on_open`` followed by frames and one ``on_closed``; nothing once abort() or close() was
called.

The TCP connection is made here, not by websocket-client (rust/phoenix-channel/src/lib.rs): each
attempt resolves the host again and tries the addresses in order until one connects, on
a socket marked with ``SO_MARK`` like every gateway socket. Owning the socket is also what
lets abort() and close() cut an attempt short from the closing thread: a blocking connect,
TLS or upgrade handshake returns at once, so an abandoned attempt (e.g. with an old public
key) can never complete its upgrade after the one that replaced it. The upgrade sends
``Host`` without port and follows no redirect (a 3xx is a transient failure), as
rust/phoenix-channel/src/lib.rs does.

The login URL carries the token: it is never logged here, error texts are passed through
:func:`redact` and a filter on the ``websocket`` logger scrubs websocket-client's own logs.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import websocket

from actors.io.udp import FIREZONE_MARK, SO_MARK
from gateway.portal.login_url import LoginUrl

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # one attempt's TCP connects, and each step of TLS and the upgrade
POLL_INTERVAL = 0.2  # how often the reader re-checks its stop flag
CLOSE_ECHO_TIMEOUT = 1.0  # how long a graceful close waits for the portal's close echo

_URL_SECRET = re.compile(r"(token=)[^&\s'\"]+")
_JSON_SECRET = re.compile(r'("(?:preshared_key|password|token)"\s*:\s*)"(?:[^"\\]|\\.)*"')

#: One ``getaddrinfo`` result: family, type, proto, canonical name, socket address.
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
#: Resolves (host, port) to stream-socket addresses, in the order to try them.
Resolve = Callable[[str, int], Sequence[AddrInfo]]


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


def resolve_stream(host: str, port: int) -> Sequence[AddrInfo]:
    """The system resolver, for TCP: what :class:`WebSocketClientConn` uses by default."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


_mark_warned = False


def set_firezone_mark(sock: socket.socket) -> None:
    """Mark the portal socket so it bypasses the tunnel's policy routing
    (rust/socket-factory/src/lib.rs).

    Without ``CAP_NET_ADMIN`` the mark cannot be set; the connection still works where
    no policy routing needs it, so that is one warning for the process, not a failure.
    """
    global _mark_warned
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("I", FIREZONE_MARK))
    except OSError as exc:
        if not _mark_warned:
            _mark_warned = True
            log.warning("cannot set SO_MARK on the portal socket (needs CAP_NET_ADMIN): %s", exc)


def _address_text(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


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

    def abort(self) -> None:
        """Drop the connection (no close frame) or cut an attempt short; non-blocking."""
        ...

    def close(self) -> None:
        """Graceful: a close frame (1000) on an open socket; otherwise as :meth:`abort`."""
        ...


WebSocketFactory = Callable[[LoginUrl, str, SocketListener], WebSocketConn]


class WebSocketClientConn:
    """websocket-client connection driven by its own ``PortalReader`` thread.

    Every report to the listener and every decision to stop is taken under ``_lock``, so
    nothing is reported once :meth:`abort` or :meth:`close` returned, and the reader
    never writes the upgrade request on a socket they have shut down. Listeners are
    therefore called with the lock held and must not call back into the conn (the
    actor's listener only tells the actor).
    """

    def __init__(
        self,
        url: LoginUrl,
        user_agent: str,
        listener: SocketListener,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        resolve: Resolve = resolve_stream,
    ) -> None:
        if not isinstance(url, LoginUrl):
            raise TypeError("the portal socket needs a LoginUrl (with public key)")
        self._url = url
        self._user_agent = user_agent
        self._listener = listener
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._resolve = resolve
        self._stop = threading.Event()
        self._graceful = False  # the stop was close(), not abort(): send/await close frames
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        #: A dup of the TCP socket, so a stop can shut the connection down whatever wraps
        #: it (TLS detaches the original socket object). Closed when the reader ends.
        self._handle: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="PortalReader", daemon=True)
        self._thread.start()

    @property
    def sock(self) -> socket.socket | None:
        """The open connection's socket (TLS-wrapped for ``wss``), for inspection."""
        ws = self._ws
        return ws.sock if ws is not None else None

    def send(self, text: str) -> None:
        ws = self._ws
        if ws is None or self._stop.is_set():
            raise ConnectionError("portal socket is not open")
        ws.send(text)

    def abort(self) -> None:
        """As rust/phoenix-channel/src/lib.rs does: drop the socket with no close frame; used for
        every reconnect."""
        self._begin_stop(graceful=False)

    def close(self) -> None:
        """The graceful stop: the portal marks the gateway offline at once on a close frame."""
        ws = self._begin_stop(graceful=True)
        if ws is not None:
            try:
                ws.send_close(websocket.STATUS_NORMAL)  # the reader shuts down on the echo
            except Exception as exc:  # already dead: the reader will notice
                log.debug("close frame not sent: %s", exc)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread; True once it has finished (tests, shutdown)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ----------------------------------------------------------------- stopping

    def _begin_stop(self, *, graceful: bool) -> websocket.WebSocket | None:
        """Stop the reader; returns the open websocket when a close frame is to be sent."""
        with self._lock:
            first = not self._stop.is_set()
            self._stop.set()
            if graceful and self._ws is not None:
                if first:
                    self._graceful = True
                    return self._ws
                return None
            self._graceful = False
            if self._handle is not None:
                try:  # wakes a blocking connect/handshake/recv in the reader at once
                    self._handle.shutdown(socket.SHUT_RDWR)
                except OSError as exc:  # not connected yet, or already gone
                    log.debug("portal socket shutdown: %s", exc)
            return None

    def _hold(self, sock: socket.socket) -> bool:
        """Register the attempt's socket for stops; False if stopped already."""
        with self._lock:
            if self._stop.is_set():
                return False
            self._handle = sock.dup()
            return True

    def _release(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def _report(self, report: Callable[..., None], *args: Any) -> bool:
        """Tell the listener unless stopped; False (nothing told) after a stop."""
        with self._lock:
            if self._stop.is_set():
                return False
            report(*args)
            return True

    def _report_failed(self, status: int | None, reason: str) -> None:
        self._report(self._listener.on_failed, status, reason)

    # ----------------------------------------------------------------- reader thread

    def _run(self) -> None:
        try:
            sock = self._connect()
            if sock is None:
                return
            ws = self._upgrade(sock)
            if ws is None:
                return
            with self._lock:
                opened = not self._stop.is_set()
                if opened:
                    self._ws = ws
                    self._listener.on_open()
            if not opened:
                ws.shutdown()
                return
            reason = self._read(ws)
            self._release()  # the dup keeps the connection up: let it go before reporting
            self._report(self._listener.on_closed, reason)
        finally:
            self._release()

    def _connect(self) -> socket.socket | None:
        """Resolve again, try each address in order; None when failed or stopped."""
        host, port = self._url.host, self._url.port
        try:
            infos = list(self._resolve(host, port))
        except (OSError, UnicodeError) as exc:
            self._report_failed(None, f"cannot resolve {host}: {exc}")
            return None
        deadline = time.monotonic() + self._connect_timeout
        errors: list[str] = []
        for index, (family, kind, proto, _name, address) in enumerate(infos):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors.append(f"{_address_text(address)}: not tried, attempt timed out")
                break
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                errors.append(f"{_address_text(address)}: {exc}")
                continue
            set_firezone_mark(sock)
            if not self._hold(sock):
                sock.close()
                return None
            # What is left of the attempt is shared by the addresses not yet tried, so a
            # black-holed address cannot use up the time of the ones after it.
            sock.settimeout(remaining / (len(infos) - index))
            try:
                sock.connect(address)
            except OSError as exc:  # refused, unreachable, timed out, or stopped
                self._release()
                sock.close()
                if self._stop.is_set():
                    return None
                errors.append(f"{_address_text(address)}: {type(exc).__name__}: {exc}")
                continue
            return sock
        detail = "; ".join(errors) if errors else "no address"
        self._report_failed(None, f"cannot connect to {host} port {port}: {detail}")
        return None

    def _upgrade(self, sock: socket.socket) -> websocket.WebSocket | None:
        """TLS for ``wss`` and the HTTP upgrade on ``sock``; None when failed or stopped."""
        url = self._url
        ws = websocket.WebSocket(enable_multithread=True)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._connect_timeout)
            if url.secure:
                context = self._ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=url.host)
            ws.connect(
                url.url,
                socket=sock,
                host=url.host_header,  # no port, even if the URL has one
                header={"User-Agent": self._user_agent},
                suppress_origin=True,  # the gateway sends no Origin
                redirect_limit=0,  # a redirect is a failed attempt, never followed
                timeout=self._connect_timeout,
            )
        except websocket.WebSocketBadStatusException as exc:
            self._release()
            sock.close()
            body = exc.resp_body.decode("utf-8", "replace") if exc.resp_body else ""
            self._report_failed(exc.status_code, redact(body.strip()[:200]))
            return None
        except Exception as exc:  # TCP, TLS, handshake errors, a redirect: all transient
            self._release()
            sock.close()
            response = ws.handshake_response
            if response is not None and 300 <= response.status <= 399:
                self._report_failed(response.status, "redirect not followed")
            else:
                self._report_failed(None, redact(f"{type(exc).__name__}: {exc}"))
            return None
        return ws

    def _read(self, ws: websocket.WebSocket) -> str:
        ws.settimeout(POLL_INTERVAL)
        while True:
            if self._stop.is_set():
                if self._graceful:
                    self._await_close_echo(ws)
                else:
                    ws.shutdown()
                return "closed locally"
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                ws.shutdown()
                return "connection closed"
            except Exception as exc:
                ws.shutdown()
                return redact(f"{type(exc).__name__}: {exc}")
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                ws.shutdown()  # websocket-client already echoed the close
                return "server closed the websocket"
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._report(self._listener.on_text, data.decode("utf-8", "replace"))
            else:
                log.debug("Received non-text message from portal (opcode %d)", opcode)

    def _await_close_echo(self, ws: websocket.WebSocket) -> None:
        """close() already sent our close frame; give the server a moment to echo it."""
        ws.settimeout(CLOSE_ECHO_TIMEOUT)
        try:
            while ws.recv_data()[0] != websocket.ABNF.OPCODE_CLOSE:
                pass
        except Exception as exc:  # timeout or the server just dropped the TCP connection
            log.debug("no close echo from portal: %s", exc)
        ws.shutdown()


def connect_websocket(url: LoginUrl, user_agent: str, listener: SocketListener) -> WebSocketConn:
    """The production :data:`WebSocketFactory`."""
    return WebSocketClientConn(url, user_agent, listener)
