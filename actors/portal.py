"""PortalActor: the websocket to the portal around a sans-IO :class:`PhoenixChannel`.

A thin shell (README.rst, "How it is built"): every message becomes one ``channel.handle_*`` call
with the current time, followed by one ``_drain()`` that carries out the channel's
actions (open/close the socket, write frames), tells the listener about events and
re-arms the single timer wake. No protocol decisions live here.

Connecting blocks, so it happens in the socket's own reader thread; the reader tells the
actor what happened, tagged with the connection *generation*. Each ``OpenSocket`` or
``CloseSocket`` starts a new generation, so frames and errors from a replaced socket
(e.g. after a key rotation) are ignored.

The channel's ``CloseSocket`` (every reconnect) aborts the socket: no close frame
(rust/phoenix-channel/src/lib.rs), and an attempt still connecting is cut short, so it cannot reach
the portal after its replacement. Only the actor's end (its stop, or a crash) closes gracefully,
with a close frame, so the portal marks the gateway offline at once (README, "Graceful stop").

The channel starts disconnected: nothing is opened until :class:`Connect` (or
:class:`KeyRotated`) brings the public key.

Failure (README, "Supervision"): an exception in a handler stops the actor; ``on_failure``
closes the socket, tells the listener it is disconnected and calls ``on_crash``, with
which the composition root starts a replacement (``actors/app.py``, ``PortalSupervisor``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pykka

from actors.clock import Clock
from actors.io.websocket import (
    WebSocketConn,
    WebSocketFactory,
    connect_websocket,
    redact_frame,
)
from actors.messages import (
    Connect,
    GetPortalStatus,
    KeyRotated,
    PortalStatus,
    SendToPortal,
    SocketClosed,
    SocketFailed,
    SocketFrame,
    SocketOpened,
)
from actors.timer import ActorTimer, Timer, Wake
from gateway.errors import LocalProtocolError
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.phoenix import (
    CloseSocket,
    ConnectionFailure,
    Disconnected,
    Fatal,
    Ingress,
    Joined,
    OpenSocket,
    PhoenixChannel,
    SendFrame,
)
from gateway.types import Rng

log = logging.getLogger(__name__)
wire_send = logging.getLogger("wire.api.send")
wire_recv = logging.getLogger("wire.api.recv")


class _GenerationListener:
    """Forwards one socket's reports to the actor, tagged with its generation."""

    def __init__(self, ref: pykka.ActorRef, generation: int) -> None:
        self._ref = ref
        self._generation = generation

    def _tell(self, message: object) -> None:
        with contextlib.suppress(pykka.ActorDeadError):  # actor stopped, socket still talking
            self._ref.tell(message)

    def on_open(self) -> None:
        self._tell(SocketOpened(self._generation))

    def on_text(self, text: str) -> None:
        self._tell(SocketFrame(self._generation, text))

    def on_closed(self, reason: str) -> None:
        self._tell(SocketClosed(self._generation, reason))

    def on_failed(self, http_status: int | None, reason: str) -> None:
        self._tell(SocketFailed(self._generation, http_status, reason))


class PortalActor(pykka.ThreadingActor):
    """Owns the portal websocket; see the module docstring."""

    def __init__(
        self,
        *,
        prototype: LoginUrlPrototype,
        listener: pykka.ActorRef,
        clock: Clock,
        rng: Rng,
        timer: Timer,
        user_agent: str,
        websocket_factory: WebSocketFactory = connect_websocket,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        #: Called (on this actor's dying thread) after a failure, with its reason.
        self._on_crash = on_crash
        self._channel = PhoenixChannel(prototype, rng, clock.monotonic())
        self._listener = listener
        self._clock = clock
        self._timer = timer
        self._user_agent = user_agent
        self._factory = websocket_factory
        self._conn: WebSocketConn | None = None
        self._generation = 0
        self._joined_since: float | None = None
        self._wake: ActorTimer | None = None

    # ----------------------------------------------------------------- lifecycle

    def on_start(self) -> None:
        self._wake = ActorTimer(self._timer, self.actor_ref)
        log.info("Portal connection prepared for %s", self._channel.prototype.redacted())

    def on_stop(self) -> None:
        self._teardown()

    def on_failure(self, exc_type: Any, exc_value: Any, _traceback: Any) -> None:
        # Pykka has logged the traceback. Not joined any more: tell the listener (readiness)
        # before the supervisor starts a replacement, whose news comes after this.
        reason = f"portal actor failed: {type(exc_value).__name__}"
        log.error("%s; the portal connection is dropped", reason)
        self._joined_since = None
        self._teardown()
        with contextlib.suppress(pykka.ActorDeadError):
            self._listener.tell(Disconnected(reason))
        if self._on_crash is not None:
            self._on_crash(reason)

    def _teardown(self) -> None:
        """The socket will not come back: a close frame tells the portal so at once."""
        self._close_socket(graceful=True)
        if self._wake is not None:
            self._wake.arm(None)

    # ----------------------------------------------------------------- messages

    def on_receive(self, message: Any) -> Any:
        now = self._clock.monotonic()
        match message:
            case Connect(public_key) | KeyRotated(public_key):
                if self._channel.state == "failed":
                    log.warning("Ignoring %s: the portal connection failed fatally", message)
                    return None
                self._channel.connect(public_key, now)
            case SendToPortal(egress):
                self._channel.send(egress)
            case Wake():
                self._channel.handle_timeout(now)
            case SocketOpened(generation) if generation == self._generation:
                self._guarded(self._channel.handle_connected, now)
            case SocketFrame(generation, text) if generation == self._generation:
                if wire_recv.isEnabledFor(logging.DEBUG):
                    wire_recv.debug("%s", redact_frame(text))
                self._channel.handle_text_frame(text, now)
            case SocketClosed(generation, reason) if generation == self._generation:
                self._channel.handle_disconnected(reason, now)
            case SocketFailed(generation, status, reason) if generation == self._generation:
                self._guarded(
                    self._channel.handle_connection_failed, ConnectionFailure(status, reason), now
                )
            case SocketOpened() | SocketFrame() | SocketClosed() | SocketFailed():
                log.debug("Ignoring news from a replaced portal socket: %s", type(message).__name__)
                return None
            case GetPortalStatus():
                return self._status()
            case _:
                log.warning("PortalActor: unexpected message %s", type(message).__name__)
                return None
        self._drain()
        return None

    def _guarded(self, handler: Any, *args: Any) -> None:
        """Socket news that no longer fits the channel's state is stale, not fatal."""
        try:
            handler(*args)
        except LocalProtocolError as exc:
            log.debug("Ignoring stale socket news: %s", exc)

    def _status(self) -> PortalStatus:
        url = self._channel.url
        return PortalStatus(
            state=self._channel.state,
            joined_since=self._joined_since,
            reconnects=self._channel.reconnects,
            connection_attempts=self._channel.connection_attempts,
            malformed_frames=self._channel.malformed_frames,
            url=url.redacted() if url is not None else self._channel.prototype.redacted(),
        )

    # ----------------------------------------------------------------- drain

    def _drain(self) -> None:
        channel = self._channel
        while True:
            action = channel.poll_action()
            if action is not None:
                self._perform(action)
                continue
            event = channel.poll_event()
            if event is None:
                break
            self._notify(event)
        if self._wake is not None:
            self._wake.arm(channel.poll_timeout())

    def _perform(self, action: OpenSocket | CloseSocket | SendFrame) -> None:
        if isinstance(action, SendFrame):
            if wire_send.isEnabledFor(logging.DEBUG):
                wire_send.debug("%s", redact_frame(action.text))
            conn = self._conn
            try:
                if conn is None:
                    raise ConnectionError("no portal socket")
                conn.send(action.text)
            except Exception as exc:
                self._channel.handle_disconnected(f"send failed: {type(exc).__name__}", self._now())
            return
        self._close_socket()
        if isinstance(action, OpenSocket):
            log.info("Connecting to portal at %s", action.url.redacted())
            listener = _GenerationListener(self.actor_ref, self._generation)
            self._conn = self._factory(action.url, self._user_agent, listener)

    def _close_socket(self, *, graceful: bool = False) -> None:
        """Abort the socket (a reconnect), or close it with a close frame (the stop)."""
        self._generation += 1
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if graceful:
                    conn.close()
                else:
                    conn.abort()
            except Exception as exc:
                log.debug("closing portal socket: %s", exc)

    def _notify(self, event: Ingress | Joined | Disconnected | Fatal) -> None:
        """Keep the status fields, then pass the core's (immutable) event on as it is."""
        match event:
            case Joined():
                self._joined_since = self._now()
                log.info("Joined the portal channel")
            case Disconnected(reason):
                self._joined_since = None
                log.info("Portal disconnected: %s", reason)
            case Fatal():
                self._joined_since = None
        with contextlib.suppress(pykka.ActorDeadError):  # a failed node exits the process
            self._listener.tell(event)

    def _now(self) -> float:
        return self._clock.monotonic()
