"""Sans-IO Phoenix channel client for the portal connection (rust/phoenix-channel/src/lib.rs).

Theory of operation
-------------------
The channel owns no socket. The shell feeds it what happens on the websocket
(``handle_connected``, ``handle_text_frame``, ``handle_connection_failed``,
``handle_disconnected``) and the time (``handle_timeout``), and carries out the actions it
polls: :class:`OpenSocket`, :class:`CloseSocket`, :class:`SendFrame`. Events for the rest
of the gateway come out of ``poll_event``.

It starts ``disconnected`` and does nothing until ``connect(public_key)``: the portal
derives ICE credentials from the key, so there is no way to connect without one (the
only URL :class:`OpenSocket` carries is a :class:`LoginUrl`, which only
``LoginUrlPrototype.with_public_key`` can make).

States and transitions::

    disconnected --connect--> connecting --handle_connected--> joining --join ok--> joined
    connecting/joining/joined --transient error--> backoff --deadline--> connecting
    any --connect(other key, or same key when not connecting)--> connecting (backoff reset)
    any --fatal--> failed (terminal)

Frames: outbound key order ``topic, event, payload, ref``; ``ref`` is a number from
one counter that starts at 0 and is never reset. Every new socket sends ``phx_join`` for
topic ``gateway`` first. Heartbeats go out on topic ``phoenix`` 30 s after the upgrade and
every 30 s after (missed ticks are skipped); a heartbeat reply must arrive within 5 s.

Errors:

* fatal (state ``failed``, event :class:`Fatal`): HTTP 4xx at the upgrade (401/403 exit
  with ``AUTH_REJECTED``, any other 4xx incl. 422 and 429 with ``FATAL``, as 1.4.x does);
  ``disconnect`` with reason ``token_expired`` (``AUTH_REJECTED``); an error reply to our
  ``phx_join`` (``AUTH_REJECTED``: the portal refuses this gateway; a restart will not
  change its mind, see :mod:`gateway.exit_codes`).
* transient (state ``backoff``, event :class:`Disconnected`): everything else: other HTTP
  statuses (3xx included: redirects are never followed), TCP/TLS errors, end of stream,
  ``phx_close``, ``disconnect`` with any other reason, a missed heartbeat, no join reply
  within 10 s, a truncated (or empty) JSON frame. Reconnects use the last URL after one
  backoff step (:mod:`gateway.backoff`). Every transient error drops the socket without
  a close frame (:class:`CloseSocket`).
* dropped (logged once, counted in ``malformed_frames``; the channel stays up): frames
  that are complete but not valid JSON, or not a valid message, and frames outside the
  bounds of :func:`decode_frame` (longer than ``MAX_FRAME_CHARS``, nested deeper than
  ``MAX_DEPTH``, ``NaN``/``Infinity`` or a number that is not a finite double, an integer
  of more than ``MAX_INT_DIGITS`` digits, a string with a lone surrogate).

Deviations from 1.4.x (documented choices):

* ``phx_error`` on topic ``gateway`` (the portal's channel process crashed) makes us
  re-send ``phx_join`` on the same socket (1.4.x only logs it and stays unjoined).
* We wait for the join reply before flushing queued messages and before reporting
  :class:`Joined`; 1.4.x writes them right behind the join. A join that is not answered
  within ``JOIN_TIMEOUT`` is treated as a dead connection.

Outbound queue: :meth:`send` while not joined queues the message (bounded by
``max_queued``; when full the oldest message is dropped and counted). The queue is
flushed, in order, after the next successful join. On ``connect`` with a *different*
public key, queued ``broadcast_ice_candidates`` and ``broadcast_invalidated_ice_candidates``
are dropped: they describe ICE sessions that the key rotation killed. ``flow_authorized``
and ``connection_ready`` are kept. Messages sent after a fatal error are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from gateway.backoff import ExponentialBackoff
from gateway.errors import LocalProtocolError, MalformedMessage, RemoteProtocolError
from gateway.exit_codes import ExitCode
from gateway.portal.login_url import LoginUrl, LoginUrlPrototype
from gateway.portal.messages import (
    INGRESS_EVENTS,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    EgressMessage,
    IngressMessage,
    check_strings,
    encode_egress,
    parse_ingress,
)
from gateway.types import Rng

log = logging.getLogger(__name__)

TOPIC: Final = "gateway"
HEARTBEAT_TOPIC: Final = "phoenix"
HEARTBEAT_INTERVAL: Final = 30.0
HEARTBEAT_TIMEOUT: Final = 5.0
JOIN_TIMEOUT: Final = 10.0
DEFAULT_MAX_QUEUED: Final = 1024
#: Bounds of an inbound frame. The largest real frame is an ``init`` with a few dozen
#: relays (a few KiB) and nests 5 levels; Python's json recurses once per level (a
#: RecursionError near 1,000) and refuses integers of more than 4,300 digits.
MAX_FRAME_CHARS: Final = 1 << 20
MAX_DEPTH: Final = 32
MAX_INT_DIGITS: Final = 20

State: TypeAlias = Literal["disconnected", "connecting", "joining", "joined", "backoff", "failed"]


# --------------------------------------------------------------------------------------
# Inputs, actions and events


@dataclass(frozen=True, slots=True)
class ConnectionFailure:
    """A failed upgrade: ``http_status`` if the server answered with a non-101 status."""

    http_status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Open a websocket to ``url`` (dropping any previous one)."""

    url: LoginUrl


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Drop the current websocket, if any: no close frame is sent."""


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Write one text frame on the current websocket."""

    text: str


Action: TypeAlias = OpenSocket | CloseSocket | SendFrame


@dataclass(frozen=True, slots=True)
class Ingress:
    message: IngressMessage


@dataclass(frozen=True, slots=True)
class Joined:
    """The ``gateway`` topic is joined; queued messages have been flushed."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket was lost (or an attempt failed); a reconnect is scheduled or under way."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """The portal refused us for good; the gateway should exit with ``exit_code``."""

    reason: str
    exit_code: int


PortalEvent: TypeAlias = Ingress | Joined | Disconnected | Fatal

_CANDIDATE_MESSAGES = (BroadcastIceCandidates, BroadcastInvalidatedIceCandidates)
_LITERALS: Final = ("true", "false", "null")


def _ends_early(text: str, error: json.JSONDecodeError) -> bool:
    """Whether the input ran out before the JSON was complete (serde_json's EOF class).

    rust/phoenix-channel/src/lib.rs treats that as an IO-level error (the frame was cut), not as a
    bad frame: the error sits at the end of the input (which covers an empty frame), inside a string
    that never ends, or on a literal cut short. Anything else is a syntax error.
    """
    rest = text[error.pos :].strip()
    if not rest or error.msg.startswith("Unterminated string"):
        return True
    return error.msg == "Expecting value" and (
        rest == "-" or any(literal.startswith(rest) for literal in _LITERALS)
    )


_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_INNERMOST = re.compile(r"\{[^{}\[\]]*\}|\[[^{}\[\]]*\]")
_BRACKET = re.compile(r"[{}\[\]]")


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether the JSON text nests containers deeper than ``limit``, without recursion and
    in linear time per round: escapes are dropped (so no quote is escaped any more), strings
    blanked, then each round replaces the innermost containers (all in C)."""
    shape = _STRING.sub('""', _ESCAPE.sub("", text))
    for _ in range(limit):
        shape, replaced = _INNERMOST.subn("0", shape)
        if not replaced:
            return False  # nothing left, or unbalanced: json.loads reports that
    return _BRACKET.search(shape) is not None


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedMessage(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage("a number out of the range of a double")
    return value


def _parse_constant(name: str) -> float:
    raise MalformedMessage(f"{name} is not JSON")


def decode_frame(text: str) -> Any:
    """``json.loads`` within bounds: raises ``json.JSONDecodeError`` for text that is not
    JSON (the caller tells a cut frame from a bad one) and :class:`MalformedMessage` for
    JSON outside the bounds in the module docstring; nothing else."""
    if len(text) > MAX_FRAME_CHARS:
        raise MalformedMessage(f"frame longer than {MAX_FRAME_CHARS} characters")
    if _nesting_exceeds(text, MAX_DEPTH):
        raise MalformedMessage(f"frame nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except (RecursionError, MemoryError) as exc:  # the bounds above should make these moot
        raise MalformedMessage(f"frame cannot be decoded ({type(exc).__name__})") from None
    check_strings(value, "frame")
    return value


class PhoenixChannel:
    """The portal connection's protocol state machine; see the module docstring."""

    def __init__(
        self,
        prototype: LoginUrlPrototype,
        rng: Rng,
        now: float,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if not isinstance(prototype, LoginUrlPrototype):
            raise LocalProtocolError("PhoenixChannel needs a LoginUrlPrototype")
        self._prototype = prototype
        self._rng = rng
        self._state: State = "disconnected"
        self._url: LoginUrl | None = None
        self._next_ref = 0
        self._backoff = ExponentialBackoff()
        self._reconnect_at: float | None = None
        self._join_ref: int | None = None
        self._join_deadline: float | None = None
        self._heartbeat_due: float | None = None
        self._heartbeat_ref: int | None = None
        self._heartbeat_deadline: float | None = None
        self._queue: deque[EgressMessage] = deque()
        self._max_queued = max_queued
        self._actions: deque[Action] = deque()
        self._events: deque[PortalEvent] = deque()
        self.dropped_messages = 0  #: queued egress messages dropped (overflow, key change)
        self.malformed_frames = 0  #: inbound frames dropped as unparseable or unknown
        self.connection_attempts = 0  #: OpenSocket actions emitted so far
        self.joins = 0  #: times the channel became joined (the first join included)

    # ----------------------------------------------------------------- introspection

    @property
    def state(self) -> State:
        return self._state

    @property
    def url(self) -> LoginUrl | None:
        """The URL of the current or last connection attempt (secret: log ``redacted()``)."""
        return self._url

    @property
    def prototype(self) -> LoginUrlPrototype:
        return self._prototype

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def reconnects(self) -> int:
        """Times the gateway joined again after having been joined: real reconnects, not
        the attempts (failed upgrades and unanswered joins) in between."""
        return max(0, self.joins - 1)

    # ----------------------------------------------------------------- inputs

    def connect(self, public_key: str, now: float) -> None:
        """(Re)connect with ``public_key``; a no-op while already connecting with it."""
        if self._state == "failed":
            raise LocalProtocolError("the portal channel failed fatally; it cannot reconnect")
        try:
            url = self._prototype.with_public_key(public_key)
        except ValueError as exc:
            raise LocalProtocolError(f"connect() needs a valid public key: {exc}") from None
        if self._state == "connecting" and self._url is not None and self._url.url == url.url:
            return
        key_changed = self._url is not None and self._url.public_key != url.public_key
        if key_changed:
            self._drop_stale_candidates()
        if self._state in ("connecting", "joining", "joined"):
            self._actions.append(CloseSocket())
            reason = "reconnecting with a new public key" if key_changed else "reconnecting"
            self._events.append(Disconnected(reason))
        self._url = url
        self._backoff.reset()
        self._open_socket()

    def handle_connected(self, now: float) -> None:
        """The websocket upgrade succeeded: join first, start the heartbeat clock."""
        if self._state != "connecting":
            raise LocalProtocolError(f"handle_connected() in state {self._state!r}")
        self._backoff.reset()
        self._state = "joining"
        self._heartbeat_due = now + HEARTBEAT_INTERVAL
        self._heartbeat_ref = None
        self._heartbeat_deadline = None
        self._send_join(now)

    def handle_connection_failed(self, error: ConnectionFailure, now: float) -> None:
        """The upgrade failed: 4xx is fatal, anything else schedules a reconnect."""
        if self._state != "connecting":
            raise LocalProtocolError(f"handle_connection_failed() in state {self._state!r}")
        status = error.http_status
        if status is not None and 400 <= status <= 499:
            code = ExitCode.AUTH_REJECTED if status in (401, 403) else ExitCode.FATAL
            self._fail(f"portal refused the connection: HTTP {status} {error.reason}".strip(), code)
            return
        prefix = f"HTTP {status} " if status is not None else ""
        self._transient(f"connection failed: {prefix}{error.reason}", now)

    def handle_disconnected(self, reason: str, now: float) -> None:
        """The socket closed or the stream ended: transient. Ignored when no socket is up."""
        if self._state in ("joining", "joined", "connecting"):
            self._transient(f"connection lost: {reason}", now)

    def handle_text_frame(self, text: str, now: float) -> None:
        """One inbound text frame. Bad frames are logged and dropped, never raised."""
        if self._state not in ("joining", "joined"):
            log.debug("Ignoring a portal frame in state %s", self._state)
            return
        try:
            frame = decode_frame(text)
        except json.JSONDecodeError as exc:
            if _ends_early(text, exc):
                self._transient(f"truncated frame from the portal ({exc.msg})", now)
            else:
                self._malformed(f"frame is not JSON ({exc.msg} at offset {exc.pos})")
            return
        except RemoteProtocolError as exc:
            self._malformed(str(exc))
            return
        if not isinstance(frame, dict):
            self._malformed("frame is not a JSON object")
            return
        topic, event, payload = frame.get("topic"), frame.get("event"), frame.get("payload")
        if not isinstance(topic, str) or not isinstance(event, str):
            self._malformed("frame lacks a string 'topic' or 'event'")
            return
        if event == "phx_reply":
            self._handle_reply(frame.get("ref"), payload, now)
        elif event == "phx_error":
            self._handle_phx_error(topic, now)
        elif event == "phx_close":
            self._transient(f"portal closed channel {topic!r:.64} (phx_close)", now)
        elif event == "disconnect":
            self._handle_disconnect(payload, now)
        elif topic != TOPIC:
            log.warning("Ignoring event %.64r on unexpected topic %.64r", event, topic)
        elif event not in INGRESS_EVENTS:
            self._malformed(f"unknown event {event[:64]!r}")
        else:
            try:
                message = parse_ingress(event, payload)
            except RemoteProtocolError as exc:
                self._malformed(f"cannot decode {event!r}: {exc}")
                return
            self._events.append(Ingress(message))

    def send(self, message: EgressMessage) -> None:
        """Send now if joined, else queue until the next join (see the module docstring)."""
        encode_egress(message)  # raises TypeError on misuse, before queueing
        if self._state == "failed":
            self.dropped_messages += 1
            log.warning("Dropping %s: the portal channel failed", type(message).__name__)
            return
        if self._state == "joined":
            self._push(*encode_egress(message))
            return
        if len(self._queue) >= self._max_queued:
            dropped = self._queue.popleft()
            self.dropped_messages += 1
            log.warning("Portal send queue full; dropping %s", type(dropped).__name__)
        self._queue.append(message)

    def handle_timeout(self, now: float) -> None:
        if self._state == "backoff":
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._open_socket()
            return
        if self._state not in ("joining", "joined"):
            return
        if self._join_deadline is not None and now >= self._join_deadline:
            self._transient("portal did not answer our join", now)
            return
        if self._heartbeat_deadline is not None and now >= self._heartbeat_deadline:
            self._transient("portal did not respond to our heartbeat", now)
            return
        due = self._heartbeat_due
        if due is not None and now >= due:
            while due <= now:  # skip missed ticks instead of bunching them
                due += HEARTBEAT_INTERVAL
            self._heartbeat_due = due
            if self._heartbeat_ref is None:
                self._heartbeat_ref = self._push("heartbeat", {}, topic=HEARTBEAT_TOPIC)
                self._heartbeat_deadline = now + HEARTBEAT_TIMEOUT

    # ----------------------------------------------------------------- outputs

    def poll_timeout(self) -> float | None:
        if self._state == "backoff":
            return self._reconnect_at
        if self._state not in ("joining", "joined"):
            return None
        candidates = [
            t
            for t in (self._join_deadline, self._heartbeat_deadline, self._heartbeat_due)
            if t is not None
        ]
        return min(candidates) if candidates else None

    def poll_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    def poll_event(self) -> PortalEvent | None:
        return self._events.popleft() if self._events else None

    # ----------------------------------------------------------------- internals

    def _open_socket(self) -> None:
        assert self._url is not None
        self._state = "connecting"
        self._reconnect_at = None
        self._clear_connection_state()
        self.connection_attempts += 1
        self._actions.append(OpenSocket(self._url))

    def _clear_connection_state(self) -> None:
        self._join_ref = None
        self._join_deadline = None
        self._heartbeat_due = None
        self._heartbeat_ref = None
        self._heartbeat_deadline = None

    def _push(self, event: str, payload: Any, *, topic: str = TOPIC) -> int:
        ref = self._next_ref
        self._next_ref += 1
        frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        self._actions.append(SendFrame(json.dumps(frame, separators=(",", ":"))))
        return ref

    def _send_join(self, now: float) -> None:
        self._state = "joining"
        self._join_ref = self._push("phx_join", None)
        self._join_deadline = now + JOIN_TIMEOUT

    def _handle_reply(self, ref: Any, payload: Any, now: float) -> None:
        if ref is None:
            log.warning("Discarding a phx_reply without ref")
            return
        if isinstance(ref, bool) or not isinstance(ref, int):
            log.warning("Discarding a phx_reply with a non-numeric ref %r", ref)
            return
        if not isinstance(payload, dict) or payload.get("status") not in ("ok", "error"):
            self._malformed("phx_reply payload lacks status 'ok' or 'error'")
            return
        if payload["status"] == "ok":
            if ref == self._heartbeat_ref:
                self._heartbeat_ref = None
                self._heartbeat_deadline = None
            elif ref == self._join_ref:
                self._joined()
            return
        response = payload.get("response")
        reason = response.get("reason") if isinstance(response, dict) else None
        reason_text = reason[:64] if isinstance(reason, str) else "other"
        if ref == self._join_ref:
            self._fail(
                f"portal refused to join channel {TOPIC!r}: {reason_text}", ExitCode.AUTH_REJECTED
            )
        else:
            log.warning("Portal request %d failed: %s", ref, reason_text)

    def _joined(self) -> None:
        self._state = "joined"
        self._join_ref = None
        self._join_deadline = None
        self.joins += 1
        self._events.append(Joined())
        while self._queue:
            self._push(*encode_egress(self._queue.popleft()))

    def _handle_phx_error(self, topic: str, now: float) -> None:
        if topic != TOPIC:
            log.debug("phx_error on topic %.64r ignored", topic)
            return
        log.warning("Portal reported a crash of channel %r; rejoining", topic)
        if self._state == "joined":
            self._events.append(Disconnected("portal channel crashed (phx_error); rejoining"))
        self._send_join(now)

    def _handle_disconnect(self, payload: Any, now: float) -> None:
        reason = payload.get("reason") if isinstance(payload, dict) else None
        if reason == "token_expired":
            self._fail("portal disconnected us: token expired", ExitCode.AUTH_REJECTED)
        else:
            self._transient(f"portal sent disconnect (reason {reason!r:.64})", now)

    def _transient(self, reason: str, now: float) -> None:
        self._actions.append(CloseSocket())
        self._clear_connection_state()
        self._state = "backoff"
        delay = self._backoff.next_delay(self._rng)
        self._reconnect_at = now + delay
        log.info("Portal connection: %s; reconnecting in %.2f s", reason, delay)
        self._events.append(Disconnected(reason))

    def _fail(self, reason: str, exit_code: int) -> None:
        self._actions.append(CloseSocket())
        self._clear_connection_state()
        self._state = "failed"
        self._reconnect_at = None
        dropped = len(self._queue)
        self._queue.clear()
        self.dropped_messages += dropped
        log.error("Portal connection failed fatally: %s", reason)
        self._events.append(Fatal(reason, int(exit_code)))

    def _drop_stale_candidates(self) -> None:
        kept: deque[EgressMessage] = deque(
            m for m in self._queue if not isinstance(m, _CANDIDATE_MESSAGES)
        )
        dropped = len(self._queue) - len(kept)
        if dropped:
            self.dropped_messages += dropped
            log.info("Dropping %d queued candidate message(s) of the old public key", dropped)
        self._queue = kept

    def _malformed(self, why: str) -> None:
        self.malformed_frames += 1
        log.error("Dropping portal frame: %s", why)
