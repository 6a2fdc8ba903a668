"""One WireGuard peer, sans-IO: handshakes (both roles), transport sessions and timers.

Contract: bytes, ``now`` (monotonic seconds) and ``unix_now`` (wall clock, for TAI64N and
``last_handshake_unix``) go in; every call returns a :data:`TunnResult` and may leave more
datagrams for :meth:`Tunnel.poll_transmit`, events for :meth:`Tunnel.poll_event` and a
deadline for :meth:`Tunnel.poll_timeout`. Bad input from the wire never raises; it comes
back as :class:`Dropped` and is counted in ``counters`` (keyed by reason).

Theory of operation (the WireGuard paper, §5 and §6):

* Sessions: ``current`` (used to send), ``previous`` (still decrypts in-flight packets)
  and ``next`` (a responder's new session, usable for sending only once the initiator's
  first transport message proves the initiator has it).
* Indices: every handshake takes a fresh 32-bit index ``(local_index & ~0xFF) | n``; the
  first one is ``local_index`` itself. A node routes messages 2/3/4 with
  :meth:`Tunnel.owns_index`, so it should hand out ``local_index`` values that differ in
  their upper 24 bits (snownet: a 24-bit LFSR value shifted left by 8).
* Timers: initiation retry every REKEY_TIMEOUT (+ up to 333 ms jitter) until
  REKEY_ATTEMPT_TIME (then :class:`ConnectionExpired`); rekey when an initiator's session
  is older than REKEY_AFTER_TIME on send (or REJECT - KEEPALIVE - REKEY_TIMEOUT on
  receive); sessions unusable after REJECT_AFTER_TIME; passive keepalive KEEPALIVE_TIMEOUT
  after data was received and nothing sent; a new handshake when data was sent and nothing
  came back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT; persistent keepalive after that long
  without sending while a session exists; all keys erased (``ConnectionExpired``) when no
  session was made for 3 x REJECT_AFTER_TIME.
* Under load (the shared :class:`HandshakeRateLimiter` counted more than its limit in the
  current second) further initiations and responses are dropped, as the Firezone 1.4
  gateway does (boringtun is given no source address, ``rust/connlib/snownet/src/node.rs``).
  No cookie reply is sent: the source of an initiation is whatever the sender claims, and
  the reply would go down the client's path, so a spoofed flood would be reflected onto
  the client whose address it names. mac1 is verified first, always.

Keys cannot be wiped from Python ``bytes``; "erasing" drops every reference to them.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gateway.drops import Drop
from gateway.errors import InvalidArgument, LocalProtocolError
from gateway.types import Address, Rng
from gateway.wg.constants import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    KEEPALIVE_TIMEOUT,
    KEY_LEN,
    MAX_QUEUED_PACKETS,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    NEW_HANDSHAKE_AFTER_SILENCE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    RESPONSE_LEN,
    SESSION_ZERO_AFTER,
    TRANSPORT_MIN_LEN,
)
from gateway.wg.cookie import CookieJar
from gateway.wg.keys import StaticKeyPair
from gateway.wg.noise import (
    HandshakeContext,
    HandshakeRejected,
    InitiatorState,
    TransportKeys,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.replay import ReplayWindow

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteToNetwork:
    """Send ``datagram`` to the peer."""

    datagram: bytes


@dataclass(frozen=True, slots=True)
class WriteToTunnel:
    """A decrypted IP packet, cut to its IP total length."""

    packet: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """The input was discarded; ``reason`` is also the key counted in ``Tunnel.counters``."""

    reason: str


class DoneType:
    """Nothing to do (a keepalive arrived, a packet was queued, a cookie was stored)."""

    __slots__ = ()
    _instance: DoneType | None = None

    def __new__(cls) -> DoneType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DONE"


DONE: Final = DoneType()

TunnResult: TypeAlias = WriteToNetwork | WriteToTunnel | Dropped | DoneType


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session became current (initiator: response received; responder: confirmed)."""

    is_initiator: bool


@dataclass(frozen=True, slots=True)
class ConnectionExpired:
    """Keys are gone: handshakes went unanswered for 90 s, or no new session for 540 s."""

    reason: str


TunnelEvent: TypeAlias = HandshakeCompleted | ConnectionExpired

_HEADER = struct.Struct("<IIQ")  # (type | reserved << 8), receiver index, counter
_NONCE = struct.Struct("<4xQ")
_PADDING = tuple(bytes(n) for n in range(16))
_INDEX_HIGH = 0xFFFFFF00

# The per-packet result is built without the frozen dataclass __init__ (which goes through
# object.__setattr__ and costs ~0.2 us more); the slot descriptors store the same field.
_new_object = object.__new__
_set_datagram = WriteToNetwork.__dict__["datagram"].__set__
_set_packet = WriteToTunnel.__dict__["packet"].__set__


def message_type(datagram: bytes) -> int | None:
    """1..4 when ``datagram`` starts like a WireGuard message (type byte, three zero bytes)."""
    if len(datagram) >= 4 and 1 <= datagram[0] <= 4 and datagram[1:4] == b"\0\0\0":
        return datagram[0]
    return None


def receiver_index(datagram: bytes) -> int | None:
    """The receiver index of a response, cookie reply or transport message."""
    kind = message_type(datagram)
    if kind == MSG_RESPONSE and len(datagram) >= 12:
        return int.from_bytes(datagram[8:12], "little")
    if kind in (MSG_COOKIE_REPLY, MSG_TRANSPORT) and len(datagram) >= 8:
        return int.from_bytes(datagram[4:8], "little")
    return None


class _Session:
    """One direction pair of transport keys with its counters and deadlines."""

    __slots__ = (
        "created_at",
        "is_initiator",
        "local_index",
        "open",
        "receive_rekey_at",
        "reject_at",
        "rekey_at",
        "remote_index",
        "replay",
        "seal",
        "send_counter",
    )

    def __init__(
        self, local_index: int, remote_index: int, keys: TransportKeys, now: float, initiator: bool
    ) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.seal = ChaCha20Poly1305(keys.send).encrypt
        self.open = ChaCha20Poly1305(keys.receive).decrypt
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created_at = now
        self.is_initiator = initiator
        self.reject_at = now + REJECT_AFTER_TIME
        # Only the initiator rekeys on age, so both ends do not start handshakes at once.
        self.rekey_at = now + REKEY_AFTER_TIME if initiator else math.inf
        self.receive_rekey_at = now + REKEY_ON_RECEIVE_AGE if initiator else math.inf


class Tunnel:
    """A WireGuard peer; see the module docstring for the contract and timers."""

    def __init__(
        self,
        *,
        static: StaticKeyPair,
        peer_public: bytes,
        preshared_key: bytes | None,
        local_index: int,
        rate_limiter: HandshakeRateLimiter,
        rng: Rng,
        now: float,
        persistent_keepalive: float | None = 25.0,
    ) -> None:
        if not 0 <= local_index <= 0xFFFFFFFF:
            raise InvalidArgument("local_index must be a 32-bit unsigned integer")
        if persistent_keepalive is not None and persistent_keepalive <= 0:
            raise InvalidArgument("persistent_keepalive must be positive or None")
        if rate_limiter.public_key != static.public:
            raise LocalProtocolError("the rate limiter belongs to another static key")
        if preshared_key is not None and len(preshared_key) != KEY_LEN:
            raise InvalidArgument("preshared key must be 32 bytes")
        self._ctx = HandshakeContext(static, bytes(peer_public), preshared_key)
        self._limiter = rate_limiter
        self._checker = rate_limiter.checker
        self._jar = CookieJar(self._ctx.peer_public)
        self._rng = rng
        self.local_index = local_index
        self._index_base = local_index & _INDEX_HIGH
        self._index_low = local_index & 0xFF
        self.persistent_keepalive = persistent_keepalive

        self._current: _Session | None = None
        self._previous: _Session | None = None
        self._next: _Session | None = None
        self._handshake: InitiatorState | None = None
        self._handshake_started_at = 0.0
        self._retry_at = math.inf
        self._last_handshake_sent_at = -math.inf
        self._last_timestamp = b""
        self._keys_born_at: float | None = None

        self._last_sent_at = now
        self._keepalive_due_at: float | None = None
        self._new_handshake_due_at: float | None = None

        self._queue: deque[bytes] = deque()
        self._outbox: deque[bytes] = deque()
        self._events: deque[TunnelEvent] = deque()

        self.tx_bytes = 0
        self.rx_bytes = 0
        self.last_handshake_unix: float | None = None
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"Tunnel(local_index={self.local_index:#010x}, has_session={self.has_session})"

    # ----------------------------------------------------------------- observability

    @property
    def peer_public(self) -> bytes:
        return self._ctx.peer_public

    @property
    def has_session(self) -> bool:
        """A current session exists (it may still have aged out since the last timer tick)."""
        return self._current is not None

    @property
    def handshake_in_flight(self) -> bool:
        return self._handshake is not None

    def owns_index(self, index: int) -> bool:
        """Whether a message with this receiver index belongs to this tunnel."""
        return (index & _INDEX_HIGH) == self._index_base

    # ------------------------------------------------------------------ data path

    def encapsulate(self, packet: bytes, now: float, unix_now: float) -> TunnResult:
        """Encrypt an IP packet (``b""``: a keepalive), or queue it behind a handshake."""
        session = self._current
        if session is not None:
            counter = session.send_counter
            if now < session.reject_at and counter < REJECT_AFTER_MESSAGES:
                session.send_counter = counter + 1
                length = len(packet)
                pad = -length & 15
                if pad:
                    packet = packet + _PADDING[pad]
                header = _HEADER.pack(MSG_TRANSPORT, session.remote_index, counter)
                datagram = header + session.seal(_NONCE.pack(counter), packet, None)
                self._last_sent_at = now
                self._keepalive_due_at = None
                if length and self._new_handshake_due_at is None:
                    self._new_handshake_due_at = now + NEW_HANDSHAKE_AFTER_SILENCE
                self.tx_bytes += len(datagram)
                if now >= session.rekey_at or counter >= REKEY_AFTER_MESSAGES:
                    self._rekey(now, unix_now)
                result = _new_object(WriteToNetwork)
                _set_datagram(result, datagram)
                return result
        return self._encapsulate_without_session(packet, now, unix_now)

    def decapsulate(self, datagram: bytes, src: Address, now: float, unix_now: float) -> TunnResult:
        """Process one datagram from the peer; see the module docstring for the results."""
        size = len(datagram)
        if size >= TRANSPORT_MIN_LEN:
            kind, index, counter = _HEADER.unpack_from(datagram)
            if kind == MSG_TRANSPORT:
                session = self._current
                if session is None or session.local_index != index:
                    session = self._session_for(index)
                    if session is None:
                        return self._drop(Drop.UNKNOWN_INDEX)
                if now >= session.reject_at:
                    return self._drop(Drop.EXPIRED_SESSION)
                try:
                    plaintext = session.open(_NONCE.pack(counter), datagram[16:], None)
                except InvalidTag:
                    return self._drop(Drop.DECRYPT_FAILED)
                if not session.replay.accept(counter):
                    return self._drop(Drop.REPLAY)
                if session is not self._current:
                    self._received_on_other_session(session, now, unix_now)
                self._new_handshake_due_at = None
                self.rx_bytes += size
                if now >= session.receive_rekey_at:
                    self._rekey(now, unix_now)
                if not plaintext:
                    return DONE
                if self._keepalive_due_at is None:
                    self._keepalive_due_at = now + KEEPALIVE_TIMEOUT
                packet = self._ip_packet(plaintext)
                if isinstance(packet, Dropped):
                    return packet
                result = _new_object(WriteToTunnel)
                _set_packet(result, packet)
                return result
        return self._decapsulate_other(datagram, src, now, unix_now)

    def decapsulate_many(
        self,
        datagrams: Iterable[tuple[bytes, Address]],
        now: float,
        unix_now: float,
        packets: list[bytes],
    ) -> list[TunnResult]:
        """:meth:`decapsulate` each ``(datagram, src)`` in order, cheaper per packet.

        The IP packets are appended to ``packets`` in order; every other result except
        ``DONE`` (WriteToNetwork, Dropped) is returned, in order. Transport data on the
        current session takes an inlined copy of :meth:`decapsulate`'s checks, in the same
        order and with the same drop reasons (about 0.5 us less per packet than a call
        each); anything else (handshakes, another session, a due rekey) goes through
        :meth:`decapsulate` itself.
        """
        others: list[TunnResult] = []
        unpack = _HEADER.unpack_from
        nonce = _NONCE.pack
        fast: _Session | None = None
        for datagram, src in datagrams:
            if fast is None:
                fast = self._fast_session(now)
            size = len(datagram)
            if fast is not None and size >= TRANSPORT_MIN_LEN:
                kind, index, counter = unpack(datagram)
                if kind == MSG_TRANSPORT and index == fast.local_index:
                    try:
                        plaintext = fast.open(nonce(counter), datagram[16:], None)
                    except InvalidTag:
                        others.append(self._drop(Drop.DECRYPT_FAILED))
                        continue
                    if not fast.replay.accept(counter):
                        others.append(self._drop(Drop.REPLAY))
                        continue
                    self._new_handshake_due_at = None
                    self.rx_bytes += size
                    if plaintext:
                        if self._keepalive_due_at is None:
                            self._keepalive_due_at = now + KEEPALIVE_TIMEOUT
                        packet = self._ip_packet(plaintext)
                        if isinstance(packet, Dropped):
                            others.append(packet)
                        else:
                            packets.append(packet)
                    continue
            result = self.decapsulate(datagram, src, now, unix_now)
            fast = None  # the slow path may have changed sessions: look again
            if type(result) is WriteToTunnel:
                packets.append(result.packet)
            elif result is not DONE:
                others.append(result)
        return others

    def _fast_session(self, now: float) -> _Session | None:
        """The current session, if its packets need nothing but the checks inlined in
        :meth:`decapsulate_many` (not expired, no rekey due on receive)."""
        session = self._current
        if session is None or now >= session.reject_at or now >= session.receive_rekey_at:
            return None
        return session

    def _ip_packet(self, plaintext: bytes) -> bytes | Dropped:
        """The IP packet in a non-empty plaintext, cut to its total length (WireGuard pads)."""
        plen = len(plaintext)
        version = plaintext[0] >> 4
        if version == 4 and plen >= 20:
            total = (plaintext[2] << 8) | plaintext[3]
            if total < 20:
                return self._drop(Drop.BAD_IP_LENGTH)
        elif version == 6 and plen >= 40:
            total = 40 + ((plaintext[4] << 8) | plaintext[5])
        else:
            return self._drop(Drop.NOT_IP)
        if total != plen:
            if total > plen:
                return self._drop(Drop.BAD_IP_LENGTH)
            plaintext = plaintext[:total]
        return plaintext

    # --------------------------------------------------------------- sans-IO verbs

    def poll_transmit(self) -> bytes | None:
        """The next datagram left over from a previous call (flushed queue, timer output)."""
        return self._outbox.popleft() if self._outbox else None

    def poll_event(self) -> TunnelEvent | None:
        return self._events.popleft() if self._events else None

    def initiate(self, now: float, unix_now: float) -> TunnResult:
        """Send a new handshake initiation now, whatever the state (initiator role)."""
        return WriteToNetwork(self._start_handshake(now, unix_now))

    def handle_timeout(self, now: float, unix_now: float) -> None:
        """Run every timer that is due at ``now``; outputs go to poll_transmit/poll_event."""
        born = self._keys_born_at
        if born is not None and now >= born + SESSION_ZERO_AFTER:
            self._expire("no_new_session")
            return
        if self._handshake is not None:
            if now >= self._handshake_started_at + REKEY_ATTEMPT_TIME:
                self._expire("handshake_timeout")
                return
            if now >= self._retry_at:
                self._outbox.append(self._send_initiation(now, unix_now))
        self._retire_expired_sessions(now)
        due = self._keepalive_due_at
        if due is not None and now >= due:
            self._keepalive_due_at = None
            if self._current is not None:
                self._send_keepalive(now, unix_now)
        due = self._new_handshake_due_at
        if due is not None and now >= due:
            self._new_handshake_due_at = None
            if self._handshake is None:
                self._outbox.append(self._start_handshake(now, unix_now))
        interval = self.persistent_keepalive
        if (
            interval is not None
            and self._current is not None
            and now >= self._last_sent_at + interval
        ):
            self._send_keepalive(now, unix_now)

    def poll_timeout(self) -> float | None:
        """The earliest absolute deadline (``now`` units) at which handle_timeout has work."""
        deadlines: list[float] = []
        if self._keys_born_at is not None:
            deadlines.append(self._keys_born_at + SESSION_ZERO_AFTER)
        if self._handshake is not None:
            deadlines.append(min(self._retry_at, self._handshake_started_at + REKEY_ATTEMPT_TIME))
        if self._keepalive_due_at is not None:
            deadlines.append(self._keepalive_due_at)
        if self._new_handshake_due_at is not None:
            deadlines.append(self._new_handshake_due_at)
        if self.persistent_keepalive is not None and self._current is not None:
            deadlines.append(self._last_sent_at + self.persistent_keepalive)
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ internals

    def _drop(self, reason: str) -> Dropped:
        self.counters[reason] += 1
        _log.debug("wireguard drop: %s", reason)
        return Dropped(reason)

    def _session_for(self, index: int) -> _Session | None:
        for session in (self._next, self._previous, self._current):
            if session is not None and session.local_index == index:
                return session
        return None

    def _received_on_other_session(self, session: _Session, now: float, unix_now: float) -> None:
        """The initiator used our ``next`` session: it is confirmed and becomes current."""
        if session is not self._next:
            return  # a late packet on ``previous``
        self._previous = self._current
        self._current = session
        self._next = None
        self.last_handshake_unix = unix_now
        self._events.append(HandshakeCompleted(is_initiator=False))
        self._flush_queue(now, unix_now)

    def _flush_queue(self, now: float, unix_now: float) -> None:
        queue = self._queue
        while queue and self._current is not None:
            result = self.encapsulate(queue.popleft(), now, unix_now)
            if isinstance(result, WriteToNetwork):
                self._outbox.append(result.datagram)

    def _encapsulate_without_session(
        self, packet: bytes, now: float, unix_now: float
    ) -> TunnResult:
        if len(self._queue) >= MAX_QUEUED_PACKETS:
            self._queue.popleft()
            self.counters[Drop.QUEUE_OVERFLOW] += 1
        self._queue.append(packet)
        if self._handshake is None and now - self._last_handshake_sent_at >= REKEY_TIMEOUT:
            return WriteToNetwork(self._start_handshake(now, unix_now))
        return DONE

    def _send_keepalive(self, now: float, unix_now: float) -> None:
        result = self.encapsulate(b"", now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._outbox.append(result.datagram)

    def _rekey(self, now: float, unix_now: float) -> None:
        """Start a handshake to refresh keys, unless one is in flight or was sent just now."""
        if self._handshake is None and now - self._last_handshake_sent_at >= REKEY_TIMEOUT:
            self._outbox.append(self._start_handshake(now, unix_now))

    def _start_handshake(self, now: float, unix_now: float) -> bytes:
        if self._handshake is None:
            self._handshake_started_at = now
        return self._send_initiation(now, unix_now)

    def _send_initiation(self, now: float, unix_now: float) -> bytes:
        index = self._allocate_index()
        body, state = create_initiation(self._ctx, index, self._rng.randbytes(KEY_LEN), unix_now)
        self._handshake = state
        message = self._jar.seal(body, now)
        self._retry_at = now + REKEY_TIMEOUT + self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)
        self._note_handshake_sent(now, len(message))
        return message

    def _note_handshake_sent(self, now: float, size: int) -> None:
        self._last_handshake_sent_at = now
        self._last_sent_at = now
        self._keepalive_due_at = None
        self.tx_bytes += size

    def _allocate_index(self) -> int:
        live = {s.local_index for s in (self._current, self._previous, self._next) if s}
        if self._handshake is not None:
            live.add(self._handshake.sender_index)
        while True:  # at most four indices are live, so this ends within five steps
            index = self._index_base | self._index_low
            self._index_low = (self._index_low + 1) & 0xFF
            if index not in live:
                return index

    def _retire_expired_sessions(self, now: float) -> None:
        current = self._current
        if current is not None and (
            now >= current.reject_at or current.send_counter >= REJECT_AFTER_MESSAGES
        ):
            self._current = None
        if self._previous is not None and now >= self._previous.reject_at:
            self._previous = None
        if self._next is not None and now >= self._next.reject_at:
            self._next = None

    def _expire(self, reason: str) -> None:
        """Erase every key and pending packet and tell the owner (the WireGuard paper, §6.3)."""
        self._current = self._previous = self._next = None
        self._handshake = None
        self._retry_at = math.inf
        self._keys_born_at = None
        self._keepalive_due_at = None
        self._new_handshake_due_at = None
        self._queue.clear()
        self._outbox.clear()
        self._events.append(ConnectionExpired(reason))
        _log.debug("wireguard connection expired: %s", reason)

    # ------------------------------------------------------------ handshake input

    def _decapsulate_other(
        self, datagram: bytes, src: Address, now: float, unix_now: float
    ) -> TunnResult:
        size = len(datagram)
        if size < 4:
            return self._drop(Drop.TOO_SHORT)
        kind = message_type(datagram)
        if kind is None:
            return self._drop(Drop.UNKNOWN_TYPE)
        if kind == MSG_TRANSPORT:
            return self._drop(Drop.TOO_SHORT)
        expected = (INITIATION_LEN, RESPONSE_LEN, COOKIE_REPLY_LEN)[kind - 1]
        if size != expected:
            return self._drop(Drop.BAD_SIZE)
        if kind == MSG_COOKIE_REPLY:
            return self._handle_cookie_reply(datagram, now)
        if not self._checker.verify_mac1(datagram):
            return self._drop(Drop.BAD_MAC1)
        if self._limiter.note_handshake(now):
            return self._drop(Drop.UNDER_LOAD)
        if kind == MSG_INITIATION:
            return self._handle_initiation(datagram, now)
        return self._handle_response(datagram, now, unix_now)

    def _handle_initiation(self, message: bytes, now: float) -> TunnResult:
        try:
            initiation = consume_initiation(self._ctx, message)
        except HandshakeRejected as exc:
            return self._drop(exc.reason)
        if initiation.timestamp <= self._last_timestamp:
            return self._drop(Drop.TIMESTAMP_REPLAY)
        self._last_timestamp = initiation.timestamp
        index = self._allocate_index()
        body, keys = create_response(self._ctx, initiation, index, self._rng.randbytes(KEY_LEN))
        self._next = _Session(index, initiation.peer_index, keys, now, initiator=False)
        self._keys_born_at = now
        self._new_handshake_due_at = None
        self.rx_bytes += len(message)
        response = self._jar.seal(body, now)
        self._note_handshake_sent(now, len(response))
        return WriteToNetwork(response)

    def _handle_response(self, message: bytes, now: float, unix_now: float) -> TunnResult:
        state = self._handshake
        if state is None or int.from_bytes(message[8:12], "little") != state.sender_index:
            return self._drop(Drop.UNKNOWN_INDEX)
        try:
            peer_index, keys = consume_response(self._ctx, state, message)
        except HandshakeRejected as exc:
            return self._drop(exc.reason)
        session = _Session(state.sender_index, peer_index, keys, now, initiator=True)
        self._handshake = None
        self._retry_at = math.inf
        # An unconfirmed responder session may still get the peer's packets: keep it as
        # ``previous`` rather than the old current one.
        self._previous = self._next if self._next is not None else self._current
        self._next = None
        self._current = session
        self._keys_born_at = now
        self._new_handshake_due_at = None
        self.rx_bytes += len(message)
        self.last_handshake_unix = unix_now
        self._events.append(HandshakeCompleted(is_initiator=True))
        # Confirm the session to the responder: the first queued packet, else a keepalive.
        first = self.encapsulate(self._queue.popleft() if self._queue else b"", now, unix_now)
        self._flush_queue(now, unix_now)
        return first

    def _handle_cookie_reply(self, message: bytes, now: float) -> TunnResult:
        index = int.from_bytes(message[4:8], "little")
        pending = self._handshake
        waiting = (pending is not None and pending.sender_index == index) or (
            self._next is not None and self._next.local_index == index
        )
        if not waiting:
            return self._drop(Drop.UNKNOWN_INDEX)
        if not self._jar.consume_reply(message, now):
            return self._drop(Drop.BAD_COOKIE)
        return DONE
