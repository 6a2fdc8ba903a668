"""The portal socket (actors/io/websocket.py) against real peers on 127.0.0.1.

A ``websockets`` server plays the portal and records every upgrade request, every
completed upgrade and how each connection ended (with or without a close frame); raw TCP
listeners stand in where a connect must hang (a full accept queue drops SYNs) or be
refused. What is checked is what the portal observes (rust/phoenix-channel/src/lib.rs,
rust/phoenix-channel/src/login_url.rs): an abandoned attempt never completes its upgrade, addresses
are tried in order, the Host header carries no port, redirects are not followed, reconnects send no
close frame while a graceful stop does, and the TCP socket carries the Firezone mark.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pykka
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve

import actors.io.websocket as portal_socket
from actors.clock import SystemClock
from actors.io.udp import FIREZONE_MARK, SO_MARK
from actors.io.websocket import WebSocketClientConn
from actors.messages import Connect, KeyRotated, PortalJoined
from actors.portal import PortalActor
from actors.timer import Timer
from gateway.portal.login_url import LoginUrl, LoginUrlPrototype
from tests.support.interop import skip_or_fail
from tests.support.portal import Recorder, next_of

KEY_A = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
KEY_B = "OR2dYCLwMEtwqtjOxSm4SU7BbHJDfM8ZCqK7HKXXxDw="
TOKEN = "portal-socket-test-token"
USER_AGENT = "Debian/12 connlib/1.4.0 (x86_64; 6.1.0)"
#: How long the server holds an upgrade it was told to hold; only reached on failure.
HOLD_SECONDS = 3.0

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def _key_of(path: str) -> str:
    return parse_qs(urlsplit(path).query).get("public_key", [""])[0]


def _hung_up(conn: ServerConnection, timeout: float) -> bool:
    """True once the client closed or reset the connection of a pending request.

    websockets reads the socket in its own thread from the start; the client sends
    nothing while it waits for the response, so that thread ends exactly on EOF/RST.
    """
    conn.recv_events_thread.join(timeout)
    return not conn.recv_events_thread.is_alive()


@dataclass(frozen=True)
class Ending:
    """How one upgraded connection ended, as the server saw it."""

    key: str
    close_code: int | None  # None: the client sent no close frame


class Portal:
    """A websockets server speaking just enough Phoenix (join and heartbeat replies)."""

    def __init__(
        self,
        *,
        hold_key: str | None = None,
        redirect: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.requests: queue.Queue[Request] = queue.Queue()
        self.upgraded: queue.Queue[str] = queue.Queue()
        self.endings: queue.Queue[Ending] = queue.Queue()
        self.hold_key = hold_key
        self.redirect = redirect
        self.held = threading.Event()  # the held request arrived
        self.hold_over = threading.Event()  # ... and its hold ended
        self.dropped = threading.Event()  # ... because the client hung up
        self._server = serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=None,
            close_timeout=1,
            ssl=tls,
        )
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def prototype(self, host: str = "127.0.0.1") -> LoginUrlPrototype:
        return LoginUrlPrototype.build(f"ws://{host}:{self.port}", TOKEN, "fz-id", "gw")

    def url(self, key: str = KEY_A) -> LoginUrl:
        return self.prototype().with_public_key(key)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.requests.put(request)
        if self.redirect:
            response = conn.respond(HTTPStatus.FOUND, "moved\n")
            response.headers["Location"] = f"ws://127.0.0.1:{self.port}/elsewhere"
            return response
        if self.hold_key is not None and _key_of(request.path) == self.hold_key:
            self.held.set()
            hung_up = _hung_up(conn, HOLD_SECONDS)
            if hung_up:
                self.dropped.set()
            self.hold_over.set()
            if hung_up:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "client left\n")
        return None  # a slow portal that still completes the upgrade

    def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        key = _key_of(ws.request.path)
        self.upgraded.put(key)
        try:
            for raw in ws:
                frame = json.loads(raw)
                if frame["event"] in ("phx_join", "heartbeat"):
                    payload = {"status": "ok", "response": {}}
                    reply = {"topic": frame["topic"], "event": "phx_reply", "payload": payload}
                    ws.send(json.dumps({**reply, "ref": frame["ref"]}))
        except ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        self.endings.put(Ending(key, rcvd.code if rcvd is not None else None))


def _drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


class Reports:
    """A SocketListener that queues what the reader reports."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def on_open(self) -> None:
        self.q.put(("open",))

    def on_text(self, text: str) -> None:
        self.q.put(("text", text))

    def on_closed(self, reason: str) -> None:
        self.q.put(("closed", reason))

    def on_failed(self, http_status: int | None, reason: str) -> None:
        self.q.put(("failed", http_status, reason))

    def next(self, timeout: float = 5.0) -> tuple[Any, ...]:
        return self.q.get(timeout=timeout)

    def all(self) -> list[tuple[Any, ...]]:
        return _drain(self.q)


@pytest.fixture
def portal() -> Iterator[Portal]:
    server = Portal()
    yield server
    server.stop()


@pytest.fixture
def conns() -> Iterator[list[WebSocketClientConn]]:
    """Conns a test opened; aborted and joined afterwards so no reader outlives it."""
    opened: list[WebSocketClientConn] = []
    yield opened
    for conn in opened:
        conn.abort()
        conn.join(5)


def _open(
    conns: list[WebSocketClientConn], url: LoginUrl, reports: Reports, **kwargs: Any
) -> WebSocketClientConn:
    conn = WebSocketClientConn(url, USER_AGENT, reports, **kwargs)
    conns.append(conn)
    return conn


def _silent_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    to it hangs in SYN_SENT (until its timeout) instead of failing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=2)
    return listener, filler


def _refused_address() -> tuple[str, int]:
    """A loopback port with nothing listening (bound, never listened: connects are refused)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    address = holder.getsockname()
    holder.close()
    return address


def _resolver(
    addresses: Sequence[tuple[str, int]], calls: list[tuple[str, int]] | None = None
) -> Callable[[str, int], list[AddrInfo]]:
    def resolve(host: str, port: int) -> list[AddrInfo]:
        if calls is not None:
            calls.append((host, port))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", addr) for addr in addresses]

    return resolve


# ------------------------------------------------------------------ 1. abandoned attempts


def test_close_aborts_a_connect_that_hangs(conns: list[WebSocketClientConn]) -> None:
    """close() shuts the raw socket down from the closing thread: a connect stuck in
    SYN_SENT returns at once instead of after its 30 s timeout, and nothing is reported."""
    listener, filler = _silent_listener()
    resolved = threading.Event()

    def resolve(host: str, port: int) -> list[AddrInfo]:
        resolved.set()
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", listener.getsockname())]

    reports = Reports()
    proto = LoginUrlPrototype.build("ws://portal.test", TOKEN, "fz-id", "gw")
    conn = _open(
        conns, proto.with_public_key(KEY_A), reports, connect_timeout=30.0, resolve=resolve
    )
    try:
        assert resolved.wait(5)
        conn.close()
        assert conn.join(2.0), "the reader is still inside connect()"
        assert reports.all() == []
    finally:
        filler.close()
        listener.close()


def test_a_conn_closed_before_it_connects_never_connects(
    conns: list[WebSocketClientConn],
) -> None:
    """Nothing is sent once close() was called (here: while the reader resolves)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    resolving, release = threading.Event(), threading.Event()

    def resolve(host: str, port: int) -> list[AddrInfo]:
        resolving.set()
        release.wait(5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", listener.getsockname())]

    try:
        reports = Reports()
        proto = LoginUrlPrototype.build("ws://portal.test", TOKEN, "fz-id", "gw")
        conn = _open(conns, proto.with_public_key(KEY_A), reports, resolve=resolve)
        assert resolving.wait(5)
        conn.close()
        release.set()
        assert conn.join(5)
        assert reports.all() == []
        # A loopback connect is in the accept queue by the time connect() returns.
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_close_during_the_upgrade_drops_it_and_only_the_new_url_upgrades(
    conns: list[WebSocketClientConn],
) -> None:
    """The server holds the old-key upgrade; close() makes the TCP connection go away
    while that request waits, so the server never completes it, and the new-key attempt
    started right after close() is the only upgrade."""
    server = Portal(hold_key=KEY_A)
    try:
        old_reports, new_reports = Reports(), Reports()
        old = _open(conns, server.url(KEY_A), old_reports)
        assert server.held.wait(5)
        old.close()
        new = _open(conns, server.url(KEY_B), new_reports)
        assert new_reports.next() == ("open",)
        assert server.hold_over.wait(HOLD_SECONDS + 2)
        assert server.dropped.is_set(), "the old attempt's connection was still up"
        assert old.join(5)
        assert old_reports.all() == []  # no on_open, no on_failed after close()
        assert new.join(0) is False  # the new conn is still open
        assert server.upgraded.get(timeout=5) == KEY_B
        assert _drain(server.upgraded) == []  # the held old-key upgrade never completed
    finally:
        server.stop()


@contextmanager
def portal_actor(prototype: LoginUrlPrototype) -> Iterator[tuple[Any, queue.Queue[Any]]]:
    """A PortalActor on the real clock and timer, its events in the inbox."""
    timer = Timer(SystemClock())
    timer.start()
    inbox: queue.Queue[Any] = queue.Queue()
    try:
        yield PortalActor.start(
            prototype=prototype, listener=Recorder.start(inbox), clock=SystemClock(),
            rng=random.Random(3), timer=timer, user_agent=USER_AGENT,
        ), inbox
    finally:
        pykka.ActorRegistry.stop_all(timeout=5)
        timer.stop()


def test_key_rotation_during_a_held_upgrade_leaves_the_portal_with_the_new_key() -> None:
    """The core requirement end to end: PortalActor rotates the key while the old-key
    upgrade is pending; the portal's last upgrade (the key it stores) is the new one."""
    server = Portal(hold_key=KEY_A)
    try:
        with portal_actor(server.prototype()) as (actor, inbox):
            actor.tell(Connect(KEY_A))
            assert server.held.wait(5)
            actor.tell(KeyRotated(KEY_B))
            next_of(inbox, PortalJoined, timeout=5)
            assert server.hold_over.wait(HOLD_SECONDS + 2)
            assert server.dropped.is_set()
            assert server.upgraded.get(timeout=5) == KEY_B  # joined: its handler already ran
            assert _drain(server.upgraded) == []  # the portal's last (stored) key is KEY_B
    finally:
        server.stop()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_close_aborts_a_pending_handshake(scheme: str, conns: list[WebSocketClientConn]) -> None:
    """A peer that accepts and then says nothing (no 101, no ServerHello): close() makes
    the reader give up at once (not after its 30 s timeout) and the peer sees EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        proto = LoginUrlPrototype.build(f"{scheme}://portal.test", TOKEN, "fz-id", "gw")
        reports = Reports()
        resolve = _resolver([listener.getsockname()])
        conn = _open(
            conns, proto.with_public_key(KEY_A), reports, connect_timeout=30.0, resolve=resolve
        )
        listener.settimeout(5)
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(5)
            assert peer.recv(65536)  # the GET, or the TLS ClientHello: then it waits
            conn.close()
            assert conn.join(2.0), "the reader is still waiting for the handshake"
            while peer.recv(65536):  # until EOF; a timeout here means it never hung up
                pass
        assert reports.all() == []
    finally:
        listener.close()


# ------------------------------------------------------------------ 2. the upgrade request


def test_host_header_is_the_host_name_without_port(
    portal: Portal, conns: list[WebSocketClientConn], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reports = Reports()
    _open(conns, portal.url(KEY_A), reports)
    assert reports.next() == ("open",)
    request = portal.requests.get(timeout=5)
    assert request.headers.get_all("Host") == ["127.0.0.1"]  # the URL has a port
    assert request.headers["User-Agent"] == USER_AGENT
    assert "Origin" not in request.headers and "Sec-WebSocket-Protocol" not in request.headers
    assert _key_of(request.path) == KEY_A and f"token={TOKEN}" in request.path
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("actors", "gateway", "websocket")]
    assert not any(TOKEN in r.getMessage() for r in ours)


def test_host_header_for_a_resolved_name(conns: list[WebSocketClientConn]) -> None:
    server = Portal()
    try:
        proto = LoginUrlPrototype.build(f"ws://portal.test:{server.port}", TOKEN, "fz-id", "gw")
        reports = Reports()
        calls: list[tuple[str, int]] = []
        resolve = _resolver([("127.0.0.1", server.port)], calls)
        _open(conns, proto.with_public_key(KEY_A), reports, resolve=resolve)
        assert reports.next() == ("open",)
        assert server.requests.get(timeout=5).headers["Host"] == "portal.test"
        assert calls == [("portal.test", server.port)]
    finally:
        server.stop()


def test_redirect_is_a_transient_failure_and_not_followed(
    conns: list[WebSocketClientConn],
) -> None:
    server = Portal(redirect=True)
    try:
        reports = Reports()
        conn = _open(conns, server.url(KEY_A), reports)
        kind, status, _reason = reports.next()
        assert (kind, status) == ("failed", 302)
        assert conn.join(5)
        assert len(_drain(server.requests)) == 1  # the Location was not fetched
    finally:
        server.stop()


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (PEM files: certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "portal.crt", tmp_path / "portal.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_portal(tmp_path: Path) -> Iterator[tuple[Portal, Path, list[str]]]:
    """A wss portal for ``portal.test``; yields it, its certificate and the SNI names seen."""
    cert, key = _certificate(tmp_path, "portal.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    names: list[str] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(str(name))

    server_context.sni_callback = record_sni
    server = Portal(tls=server_context)
    yield server, cert, names
    server.stop()


def test_wss_checks_the_certificate_for_the_url_host_with_sni(
    tls_portal: tuple[Portal, Path, list[str]], conns: list[WebSocketClientConn]
) -> None:
    server, cert, names = tls_portal
    proto = LoginUrlPrototype.build(f"wss://portal.test:{server.port}", TOKEN, "fz-id", "gw")
    reports = Reports()
    _open(
        conns,
        proto.with_public_key(KEY_A),
        reports,
        ssl_context=ssl.create_default_context(cafile=str(cert)),
        resolve=_resolver([("127.0.0.1", server.port)]),
    )
    assert reports.next() == ("open",)
    assert names == ["portal.test"]
    request = server.requests.get(timeout=5)
    assert request.headers["Host"] == "portal.test" and _key_of(request.path) == KEY_A


def test_wss_with_an_untrusted_certificate_is_a_transient_failure(
    tls_portal: tuple[Portal, Path, list[str]], conns: list[WebSocketClientConn]
) -> None:
    server, _cert, _names = tls_portal
    proto = LoginUrlPrototype.build(f"wss://portal.test:{server.port}", TOKEN, "fz-id", "gw")
    reports = Reports()
    resolve = _resolver([("127.0.0.1", server.port)])
    _open(conns, proto.with_public_key(KEY_A), reports, resolve=resolve)  # system roots
    kind, status, reason = reports.next()
    assert (kind, status) == ("failed", None) and "CERTIFICATE_VERIFY_FAILED" in reason
    assert server.requests.empty()


# ------------------------------------------------------------------ 3. addresses in order


@pytest.mark.parametrize("first", ["refused", "silent"])
def test_each_resolved_address_is_tried_in_order(
    portal: Portal, conns: list[WebSocketClientConn], first: str
) -> None:
    """A refused or a black-holed first address does not end the attempt."""
    listener = filler = None
    if first == "silent":
        listener, filler = _silent_listener()
        bad = listener.getsockname()
    else:
        bad = _refused_address()
    try:
        proto = LoginUrlPrototype.build("ws://portal.test", TOKEN, "fz-id", "gw")
        reports = Reports()
        calls: list[tuple[str, int]] = []
        resolve = _resolver([bad, ("127.0.0.1", portal.port)], calls)
        _open(conns, proto.with_public_key(KEY_A), reports, connect_timeout=1.0, resolve=resolve)
        assert reports.next() == ("open",)
        assert calls == [("portal.test", 80)]  # ws:// without port: 80
        assert _key_of(portal.requests.get(timeout=5).path) == KEY_A
    finally:
        for sock in (filler, listener):
            if sock is not None:
                sock.close()


def test_all_addresses_failing_is_transient(conns: list[WebSocketClientConn]) -> None:
    first, second = _refused_address(), _refused_address()
    proto = LoginUrlPrototype.build("ws://portal.test", TOKEN, "fz-id", "gw")
    reports = Reports()
    _open(conns, proto.with_public_key(KEY_A), reports, resolve=_resolver([first, second]))
    kind, status, reason = reports.next()
    assert (kind, status) == ("failed", None)
    assert f"127.0.0.1:{first[1]}" in reason and f"127.0.0.1:{second[1]}" in reason


def test_resolution_failure_on_an_attempt_is_transient(conns: list[WebSocketClientConn]) -> None:
    def resolve(host: str, port: int) -> list[AddrInfo]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    proto = LoginUrlPrototype.build("ws://portal.test", TOKEN, "fz-id", "gw")
    reports = Reports()
    _open(conns, proto.with_public_key(KEY_A), reports, resolve=resolve)
    kind, status, reason = reports.next()
    assert (kind, status) == ("failed", None) and "portal.test" in reason


# ------------------------------------------------------------------ 6. SO_MARK


def test_the_portal_socket_carries_the_firezone_mark(
    portal: Portal, conns: list[WebSocketClientConn]
) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (CAP_NET_ADMIN) to set SO_MARK")
    reports = Reports()
    conn = _open(conns, portal.url(KEY_A), reports)
    assert reports.next() == ("open",)
    sock = conn.sock
    assert sock is not None
    (mark,) = struct.unpack("I", sock.getsockopt(socket.SOL_SOCKET, SO_MARK, 4))
    assert mark == FIREZONE_MARK


def test_a_mark_that_cannot_be_set_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Unprivileged:
        def setsockopt(self, *args: Any) -> None:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(portal_socket, "_mark_warned", False)
    caplog.set_level(logging.DEBUG, logger="actors.io.websocket")
    portal_socket.set_firezone_mark(Unprivileged())  # type: ignore[arg-type]
    portal_socket.set_firezone_mark(Unprivileged())  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SO_MARK" in warnings[0].getMessage()


# ------------------------------------------------------------------ 7. close frames


def test_abort_sends_no_close_frame_and_close_sends_1000(
    portal: Portal, conns: list[WebSocketClientConn]
) -> None:
    dropped_reports, closed_reports = Reports(), Reports()
    dropped = _open(conns, portal.url(KEY_A), dropped_reports)
    assert dropped_reports.next() == ("open",)
    dropped.abort()
    assert portal.endings.get(timeout=5) == Ending(KEY_A, None)
    closed = _open(conns, portal.url(KEY_B), closed_reports)
    assert closed_reports.next() == ("open",)
    closed.close()
    assert portal.endings.get(timeout=5) == Ending(KEY_B, 1000)
    assert dropped.join(5) and closed.join(5)
    assert dropped_reports.all() == [] and closed_reports.all() == []


def test_actor_reconnects_without_close_frame_and_stops_with_one(portal: Portal) -> None:
    with portal_actor(portal.prototype()) as (actor, inbox):
        actor.tell(Connect(KEY_A))
        next_of(inbox, PortalJoined, timeout=5)
        actor.tell(KeyRotated(KEY_B))
        next_of(inbox, PortalJoined, timeout=5)
        assert portal.endings.get(timeout=5) == Ending(KEY_A, None)  # reconnect: dropped
        actor.tell(Connect(KEY_B))  # same key while joined: a forced reconnect, dropped too
        next_of(inbox, PortalJoined, timeout=5)
        assert portal.endings.get(timeout=5) == Ending(KEY_B, None)
        actor.stop(timeout=5)
        assert portal.endings.get(timeout=5) == Ending(KEY_B, 1000)  # graceful stop
