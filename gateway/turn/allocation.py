"""TURN client for one relay, as snownet runs it (rust/connlib/snownet/src/allocation.rs); sans-IO.

Life cycle: BINDING to every server address (the first answer picks the active server and
each answer yields a server-reflexive candidate) -> ALLOCATE with long-term credentials ->
REFRESH at half the lifetime -> channels bound on demand and re-bound while in use.
Requests are retransmitted 1 s, x1.5, until 10 s have elapsed; authenticated requests get a
fresh transaction id on every send.

New credentials for the same relay (the portal draws fresh ones for every ``init``) do not
replace a made allocation: it keeps the credentials that made it (coturn binds an allocation
to its username), so its relayed address, channels and the connections relayed through it
survive a portal reconnect; the new ones are used from the next ALLOCATE on, or as soon as
the relay rejects the old ones (:meth:`Allocation.update_credentials`).
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from gateway.drops import Drop, Event
from gateway.errors import InvalidArgument, MalformedPacket
from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    encode,
    long_term_key,
    verify_integrity,
)
from gateway.turn.channel_data import decode_channel_data, encode_channel_data
from gateway.types import Address, Rng, Transmit

logger = logging.getLogger(__name__)

#: Datagrams from a relay larger than this are never processed
#: (rust/connlib/snownet/src/allocation.rs).
MAX_STUN_DATAGRAM = 1336
INITIAL_RTO = 1.0
RTO_MULTIPLIER = 1.5
MAX_RETRANSMIT_ELAPSED = 10.0
CHANNEL_FIRST = 0x4000
CHANNEL_LAST = 0x4FFF
CHANNEL_LIFETIME = 600.0
CHANNEL_REFRESH_AGE = CHANNEL_LIFETIME / 2
CHANNEL_REUSE_IDLE = CHANNEL_LIFETIME + 300.0
MAX_BUFFERED_CHANNEL_BINDINGS = 100
REQUESTED_TRANSPORT_UDP = b"\x11\x00\x00\x00"
ADDITIONAL_FAMILY_IPV6 = b"\x02\x00\x00\x00"

NO_RESPONSE = "no response received. Is STUN blocked?"
#: After a 437 whose clean-up delete the relay refused: ALLOCATE again this much later,
#: at most this many times (the stale allocation is normally gone within a second).
ALLOCATE_RETRY_DELAY = 1.0
ALLOCATE_RETRIES = 5
AUTHENTICATION_ERROR = "authentication error"

CandidateKind = Literal["srflx", "relay"]


@dataclass(frozen=True, slots=True)
class CandidateAdded:
    kind: CandidateKind
    address: Address
    base: Address | None


@dataclass(frozen=True, slots=True)
class CandidateRemoved:
    kind: CandidateKind
    address: Address


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """The allocation gave up for good; the node should drop it."""

    reason: str


AllocationEvent: TypeAlias = CandidateAdded | CandidateRemoved | AllocationFailed


def _family(addr: Address) -> int:
    return 6 if ":" in addr[0] else 4


@dataclass(slots=True)
class _Request:
    """One outstanding transaction and what to do when it resolves or times out."""

    method: int
    dst: Address
    raw: bytes
    attributes: list[tuple[int, bytes]]  # without authentication, for re-sending
    authenticated: bool
    carried_nonce: bool
    first_sent: float
    deadline: float
    interval: float
    peer: Address | None = None  # CHANNEL-BIND
    channel: int | None = None  # CHANNEL-BIND
    delete: bool = False  # REFRESH with LIFETIME 0
    reallocate: bool = False  # ALLOCATE again once the delete succeeded (437 handling)


def _method_name(request: _Request) -> str:
    return Method(request.method).name


@dataclass(slots=True)
class _Channel:
    peer: Address
    bound: bool
    bound_at: float
    data_since_bind: bool = False
    last_received: float = 0.0
    in_flight: bool = False


class Allocation:
    """TURN client for ONE relay (rust/connlib/snownet/src/allocation.rs); sans-IO."""

    def __init__(
        self,
        *,
        relay_id: str,
        servers: Sequence[Address],
        username: str,
        password: str,
        software: str,
        rng: Rng,
        now: float,
        realm: str = "firezone",
    ) -> None:
        if not servers:
            raise InvalidArgument("an allocation needs at least one server address")
        self.relay_id = relay_id
        self._servers: tuple[Address, ...] = tuple(dict.fromkeys(servers))
        self._server_set = frozenset(self._servers)
        self._username = username
        self._password = password
        self._realm = realm
        self._key: bytes | None = long_term_key(username, realm, password)
        #: Newer credentials from the portal, waiting for the allocation they replace to end.
        self._next_credentials: tuple[str, str] | None = None
        self._nonce: str | None = None
        self._software = software.encode()
        self._rng = rng

        self._active: Address | None = None
        self._srflx: dict[int, tuple[Address, Address]] = {}
        self._relays: dict[int, Address] = {}
        self._lifetime: tuple[float, float] | None = None  # (received at, seconds)

        self._requests: dict[bytes, _Request] = {}
        self._allocate_retry_at: float | None = None
        self._allocate_retries = 0
        self._channels: dict[int, _Channel] = {}
        #: (rebind deadline, channel, bound_at) of channels that carried data since their
        #: bind; stale entries are skipped. Keeps timers O(log C) with thousands of channels.
        self._rebind_due: list[tuple[float, int, float]] = []
        self._channel_by_peer: dict[Address, int] = {}
        self._next_channel = CHANNEL_FIRST
        self._buffered_bindings: deque[Address] = deque(maxlen=MAX_BUFFERED_CHANNEL_BINDINGS)
        self._rejected_attributes: dict[int, set[int]] = {}  # per method, learned from 420s

        self._transmits: deque[Transmit] = deque()
        self._events: deque[AllocationEvent] = deque()
        self.is_freed = False
        #: Replaced while still being made (see :meth:`deallocate`).
        self._retiring = False
        self.counters: Counter[str] = Counter()

        self._send_bindings(now)

    # ---- configuration ------------------------------------------------------------------

    def server_addresses(self) -> frozenset[Address]:
        return self._server_set

    def active_server(self) -> Address | None:
        return self._active

    def same_config(self, servers: Sequence[Address], username: str, password: str) -> bool:
        """True when a relay update describes this very allocation (``update_relays`` in
        rust/connlib/snownet/src/node.rs)."""
        return (
            frozenset(servers) == self._server_set
            and username == self._username
            and password == self._password
        )

    def same_servers(self, servers: Sequence[Address]) -> bool:
        return frozenset(servers) == self._server_set

    def update_credentials(self, username: str, password: str, now: float) -> None:
        """The portal sent other credentials for this relay (it does on every ``init``).

        An allocation that exists on the relay, or that an authenticated ALLOCATE in flight
        may be making, keeps the credentials that made it: a relay that binds allocations
        to the username (coturn) refuses any other for its REFRESH and CHANNEL-BIND (441),
        and replacing it would drop its relayed address and every connection relayed
        through it. The new credentials wait for the next ALLOCATE (the allocation expired,
        was lost or deleted) or for the relay to reject the old ones. With nothing made
        yet they apply at once. A suspended allocation starts over (``refresh``) and a
        made one is refreshed, as a relay left out of an ``init`` is (``update_relays`` in
        Firezone's ``rust/connlib/snownet/src/node.rs``).
        """
        if self.is_freed:
            return
        if username == self._username and password == self._password:
            self._next_credentials = None
        elif self._relays or self._allocate_in_flight():
            self._next_credentials = (username, password)
            logger.info(
                "relay %s: new credentials; the allocation keeps the ones that made it",
                self.relay_id,
            )
        else:
            self._next_credentials = (username, password)
            self._adopt_next_credentials()
        self.refresh(now)

    def _allocate_in_flight(self) -> bool:
        """An authenticated ALLOCATE is out: it may have made an allocation on the relay."""
        return any(
            r.method == Method.ALLOCATE and r.carried_nonce for r in self._requests.values()
        )

    def _adopt_next_credentials(self) -> bool:
        if self._next_credentials is None:
            return False
        self._username, self._password = self._next_credentials
        self._next_credentials = None
        self._key = long_term_key(self._username, self._realm, self._password)
        logger.info("relay %s: using the new credentials", self.relay_id)
        return True

    def relay_addresses(self) -> list[Address]:
        return [self._relays[f] for f in (4, 6) if f in self._relays]

    def srflx_addresses(self) -> list[tuple[Address, Address]]:
        return [self._srflx[f] for f in (4, 6) if f in self._srflx]

    # ---- inbound ------------------------------------------------------------------------

    def handle_stun(
        self, msg: StunMessage, raw: bytes, src: Address, local: Address, now: float
    ) -> bool:
        """Process a STUN message from ``src``; True when ``src`` is one of our servers."""
        if src not in self._server_set:
            return False
        if len(raw) > MAX_STUN_DATAGRAM:
            self._drop(Drop.OVERSIZED)
        elif self.is_freed:
            self._drop(Drop.FREED)
        elif msg.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            self._drop(Drop.NOT_A_RESPONSE)
        else:
            request = self._requests.get(msg.transaction_id)
            if request is None:
                self._drop(Drop.UNKNOWN_TRANSACTION)
            elif request.dst != src:
                self._drop(Drop.WRONG_SOURCE)
            elif request.method != msg.method:
                self._drop(Drop.METHOD_MISMATCH)
            else:
                try:
                    self._handle_response(request, msg, raw, local, now)
                except MalformedPacket as exc:
                    self._drop(Drop.MALFORMED, str(exc))
        return True

    def _handle_response(
        self, request: _Request, msg: StunMessage, raw: bytes, local: Address, now: float
    ) -> None:
        if request.authenticated:
            has_integrity = msg.get(Attr.MESSAGE_INTEGRITY) is not None
            if has_integrity and (self._key is None or not verify_integrity(raw, self._key)):
                self._drop(Drop.INTEGRITY_FAILED)
                return
            if not has_integrity and msg.cls == MessageClass.SUCCESS:
                self._drop(Drop.MISSING_INTEGRITY)
                return
        if msg.cls == MessageClass.ERROR:
            error = msg.error_code()
            if error is None:
                raise MalformedPacket("error response without ERROR-CODE")
            self._handle_error(request, msg, error, now)
            return
        if request.method == Method.BINDING:
            self._on_binding_success(request, msg, local, now)
        elif request.method == Method.ALLOCATE:
            self._on_allocate_success(request, msg, now)
        elif request.method == Method.REFRESH:
            self._on_refresh_success(request, msg, now)
        elif request.method == Method.CHANNEL_BIND:
            self._on_channel_bind_success(request, msg, now)

    def _on_binding_success(
        self, request: _Request, msg: StunMessage, local: Address, now: float
    ) -> None:
        mapped = msg.xor_address(Attr.XOR_MAPPED_ADDRESS)
        del self._requests[msg.transaction_id]
        if mapped is not None:
            family = _family(request.dst)
            old = self._srflx.get(family)
            if old is None or old != (mapped, local):
                self._srflx[family] = (mapped, local)
                self._events.append(CandidateAdded("srflx", mapped, local))
                if old is not None:
                    self._events.append(CandidateRemoved("srflx", old[0]))
        if self._active is not None:
            return
        self._active = request.dst
        logger.debug("relay %s: active server %s", self.relay_id, request.dst)
        if self._relays:
            self._send_refresh(now)
        else:
            self._send_allocate(now)

    def _on_allocate_success(self, request: _Request, msg: StunMessage, now: float) -> None:
        lifetime = msg.lifetime()
        relayed = msg.xor_addresses(Attr.XOR_RELAYED_ADDRESS)
        if lifetime is None or not relayed:
            self._drop(Drop.ALLOCATE_SUCCESS_INCOMPLETE)
            return
        del self._requests[msg.transaction_id]
        if self._retiring:
            logger.info("relay %s: deleting the allocation a replaced ALLOCATE made", self.relay_id)
            self._send_delete(now, reallocate=False)
            return
        new: dict[int, Address] = {}
        for addr in relayed:
            new.setdefault(_family(addr), addr)
        self._lifetime = (now, float(lifetime))
        for family in (4, 6):
            old_addr, new_addr = self._relays.get(family), new.get(family)
            if old_addr == new_addr:
                continue
            if new_addr is not None:
                self._events.append(CandidateAdded("relay", new_addr, None))
            if old_addr is not None:
                self._events.append(CandidateRemoved("relay", old_addr))
        self._relays = new
        self._allocate_retries = 0
        logger.info(
            "relay %s: allocated %s, lifetime %d s", self.relay_id, self.relay_addresses(), lifetime
        )
        buffered = list(self._buffered_bindings)
        self._buffered_bindings.clear()
        for peer in buffered:
            self.bind_channel(peer, now)

    def _on_refresh_success(self, request: _Request, msg: StunMessage, now: float) -> None:
        lifetime = msg.lifetime()
        if lifetime is None:
            self._drop(Drop.REFRESH_SUCCESS_WITHOUT_LIFETIME)
            return
        del self._requests[msg.transaction_id]
        if lifetime == 0:
            self._invalidate()
            if request.reallocate:
                self._send_allocate(now)
            return
        if self._relays:
            self._lifetime = (now, float(lifetime))

    def _on_channel_bind_success(self, request: _Request, msg: StunMessage, now: float) -> None:
        del self._requests[msg.transaction_id]
        assert request.channel is not None
        channel = self._channels.get(request.channel)
        if channel is None or channel.peer != request.peer:
            self._drop(Drop.CHANNEL_BIND_FOR_FORGOTTEN_CHANNEL)
            return
        channel.bound = True
        channel.in_flight = False
        channel.bound_at = now
        channel.data_since_bind = False
        logger.debug(
            "relay %s: channel %#x bound to %s", self.relay_id, request.channel, channel.peer
        )

    def _handle_error(
        self, request: _Request, msg: StunMessage, error: tuple[int, str], now: float
    ) -> None:
        code, reason = error
        if self._retiring and request.method == Method.ALLOCATE:
            del self._requests[msg.transaction_id]  # refused: it made nothing to delete
            return
        if code in (401, 438):
            offered_realm = msg.realm()
            nonce = msg.nonce()
            if code == 401 and request.carried_nonce:
                del self._requests[msg.transaction_id]
                if self._adopt_next_credentials():
                    # The old credentials expired (or the relay's secret changed): the
                    # portal has given newer ones since.
                    self._resend_authenticated(request, now, fresh_backoff=True)
                    return
                logger.warning(
                    "relay %s: credentials rejected (%d %s)", self.relay_id, code, reason
                )
                self._free(AUTHENTICATION_ERROR)
                return
            if offered_realm is not None and offered_realm != self._realm:
                del self._requests[msg.transaction_id]
                self._drop(Drop.WRONG_REALM)
                logger.warning(
                    "relay %s: refusing to authenticate to realm %r", self.relay_id, offered_realm
                )
                return
            if nonce is None:
                self._drop(Drop.CHALLENGE_WITHOUT_NONCE)
                return
            del self._requests[msg.transaction_id]
            self._nonce = nonce
            self._resend_authenticated(request, now, fresh_backoff=True)
            return

        if code == 420 and self._drop_rejected_attributes(request, msg):
            del self._requests[msg.transaction_id]
            self._resend_authenticated(request, now, fresh_backoff=True)
            return

        del self._requests[msg.transaction_id]
        self.counters[f"error_{code}"] += 1
        logger.warning(
            "relay %s: %s failed: %d %s", self.relay_id, _method_name(request), code, reason
        )
        if request.method == Method.ALLOCATE:
            if code == 437:
                self._send_delete(now, reallocate=True)
            else:
                self._buffered_bindings.clear()
        elif request.method == Method.REFRESH:
            if request.delete and request.reallocate and self._allocate_retries < ALLOCATE_RETRIES:
                # The allocation that caused the 437 is not ours to delete (other
                # credentials: coturn answers 441); it is usually on its way out (a relay
                # frees a deleted allocation on its next timer tick): try again shortly.
                self._allocate_retries += 1
                self._allocate_retry_at = now + ALLOCATE_RETRY_DELAY
            elif request.delete:
                self._invalidate()
            else:
                self._invalidate()
                self._send_allocate(now)
        elif request.method == Method.CHANNEL_BIND:
            assert request.peer is not None and request.channel is not None
            if code == 437:
                self._invalidate()
                self._buffered_bindings.append(request.peer)
                self._send_allocate(now)
            else:
                self._forget_channel(request.channel)

    def _drop_rejected_attributes(self, request: _Request, msg: StunMessage) -> bool:
        """420: leave out the attributes the relay does not know, from now on, if we sent any.

        coturn 4.6.1 rejects REQUESTED-TRANSPORT in REFRESH, which snownet always sends.
        """
        unknown = set(msg.unknown_attributes() or ())
        sent = {kind for kind, _ in request.attributes}
        rejected = unknown & sent
        if not rejected:
            return False
        self._rejected_attributes.setdefault(request.method, set()).update(rejected)
        request.attributes = [a for a in request.attributes if a[0] not in rejected]
        self.counters[Event.ATTRIBUTES_REJECTED] += 1
        logger.info(
            "relay %s: %s without attributes %s the relay does not know",
            self.relay_id,
            _method_name(request),
            sorted(hex(a) for a in rejected),
        )
        return True

    def decapsulate(
        self, data: bytes, src: Address, now: float
    ) -> tuple[Address, bytes, Address] | None:
        """Unwrap ChannelData from the active server: (peer, payload, our relayed address)."""
        if src != self._active:
            return None
        decoded = decode_channel_data(data)
        if decoded is None:
            self.counters[Drop.MALFORMED_CHANNEL_DATA] += 1
            return None
        number, payload = decoded
        channel = self._channels.get(number)
        if channel is None or not channel.bound:
            self.counters[Drop.UNKNOWN_CHANNEL] += 1
            return None
        relay = self._relays.get(_family(channel.peer))
        if relay is None:
            self.counters[Drop.NO_RELAY_FOR_FAMILY] += 1
            return None
        if not channel.data_since_bind:
            self._note_data_since_bind(number, channel)
        channel.last_received = now
        return channel.peer, payload, relay

    def expects(self, msg: StunMessage) -> bool:
        """Whether ``msg`` answers one of our outstanding requests (by transaction id)."""
        return msg.transaction_id in self._requests

    @property
    def busy(self) -> bool:
        """Requests are still outstanding (a delete being retried, for instance)."""
        return bool(self._requests)

    def note_channel_data(self, number: int, now: float) -> None:
        """Data arrived on channel ``number`` outside :meth:`decapsulate` (a shell's fast
        path unwrapped it): keep the channel's rebind and reuse bookkeeping right."""
        channel = self._channels.get(number)
        if channel is not None and channel.bound:
            if not channel.data_since_bind:
                self._note_data_since_bind(number, channel)
            channel.last_received = now

    # ---- outbound data --------------------------------------------------------------------

    def channel_for(self, peer: Address, now: float | None = None) -> int | None:
        """The confirmed channel number to ``peer`` (unexpired when ``now`` is given)."""
        number = self._channel_by_peer.get(peer)
        if number is None:
            return None
        channel = self._channels[number]
        if not channel.bound:
            return None
        if now is not None and now - channel.bound_at >= CHANNEL_LIFETIME:
            return None
        return number

    def has_channel(self, peer: Address) -> bool:
        return self.channel_for(peer) is not None

    def encapsulate(self, peer: Address, payload: bytes, now: float) -> Transmit | None:
        """ChannelData to the active server, or None when there is no usable channel."""
        number = self.channel_for(peer, now)
        if number is None or self._active is None:
            self.counters[Drop.NO_CHANNEL] += 1
            return None
        return Transmit(None, self._active, encode_channel_data(number, payload))

    def bind_channel(self, peer: Address, now: float) -> None:
        """Bind (or keep bound) a channel to ``peer``; buffered until an allocation exists."""
        if self.is_freed:
            return
        number = self._channel_by_peer.get(peer)
        if number is not None:
            channel = self._channels[number]
            if channel.in_flight or now - channel.bound_at < CHANNEL_LIFETIME:
                return
            self._send_channel_bind(peer, number, now)  # expired: bind the same number again
            return
        if not self._relays:
            if peer not in self._buffered_bindings:
                self._buffered_bindings.append(peer)
            return
        if _family(peer) not in self._relays:
            self.counters[Drop.NO_RELAY_FOR_FAMILY] += 1
            return
        number = self._free_channel_number(now)
        if number is None:
            self.counters[Drop.CHANNELS_EXHAUSTED] += 1
            logger.warning("relay %s: all channel numbers in use", self.relay_id)
            return
        old = self._channels.get(number)
        if old is not None:
            del self._channel_by_peer[old.peer]
        self._channels[number] = _Channel(peer, bound=False, bound_at=now, last_received=now)
        self._channel_by_peer[peer] = number
        self._send_channel_bind(peer, number, now)

    def _free_channel_number(self, now: float) -> int | None:
        span = CHANNEL_LAST - CHANNEL_FIRST + 1
        for step in range(span):
            number = CHANNEL_FIRST + (self._next_channel - CHANNEL_FIRST + step) % span
            channel = self._channels.get(number)
            if channel is None or (
                channel.bound
                and not channel.in_flight
                and now - max(channel.bound_at, channel.last_received) >= CHANNEL_REUSE_IDLE
            ):
                self._next_channel = CHANNEL_FIRST + (number + 1 - CHANNEL_FIRST) % span
                return number
        return None

    def _forget_channel(self, number: int) -> None:
        channel = self._channels.pop(number, None)
        if channel is not None:
            self._channel_by_peer.pop(channel.peer, None)

    # ---- control --------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """Suspended (no allocation, nothing in flight): start over from BINDING; else REFRESH."""
        if self.is_freed:
            return
        if self._relays:
            if not self._in_flight(Method.REFRESH):
                self._send_refresh(now)
        elif not self._requests and self._allocate_retry_at is None:  # a retry is due soon
            self._active = None
            self._send_bindings(now)

    def deallocate(self, now: float) -> None:
        """Delete the allocation on the relay (REFRESH with LIFETIME 0); local state goes now.

        One still being made is retired instead: BINDINGs and unauthenticated ALLOCATEs in
        flight are forgotten (the relay keeps nothing for them) and nothing new is asked,
        but an authenticated ALLOCATE in flight is awaited (``busy``), so that should it
        have made an allocation, that is deleted at once with these credentials: a relay
        that binds allocations to the username (coturn) lets no one else delete it.
        """
        if self._relays and self._active is not None and self._key is not None:
            self._invalidate()
            self._buffered_bindings.clear()
            self._send_delete(now, reallocate=False)
            return
        self._retiring = True
        self._buffered_bindings.clear()
        self._allocate_retry_at = None
        self._requests = {
            tid: r for tid, r in self._requests.items()
            if r.method == Method.ALLOCATE and r.carried_nonce
        }

    # ---- timers ---------------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        if self.is_freed:
            return
        if self._lifetime is not None and now >= self._lifetime[0] + self._lifetime[1]:
            logger.info("relay %s: allocation expired", self.relay_id)
            self._invalidate()
        for tid, request in list(self._requests.items()):
            if request.deadline <= now and tid in self._requests:
                del self._requests[tid]
                self._retransmit_or_give_up(request, now)
                if self.is_freed:
                    return
        self._retry_allocate_due(now)
        if (
            self._lifetime is not None
            and now >= self._refresh_at()
            and not self._in_flight(Method.REFRESH)
        ):
            self._send_refresh(now)
        if self._relays and self._active is not None:
            due = self._rebind_due
            while due and due[0][0] <= now:
                _deadline, number, bound_at = heapq.heappop(due)
                channel = self._channels.get(number)
                if (channel is not None and channel.bound_at == bound_at
                        and self._channel_needs_rebind(channel)):
                    self._send_channel_bind(channel.peer, number, now)

    def _retry_allocate_due(self, now: float) -> None:
        if self._allocate_retry_at is not None and now >= self._allocate_retry_at:
            self._allocate_retry_at = None
            self._send_allocate(now)

    def _retransmit_or_give_up(self, request: _Request, now: float) -> None:
        if request.deadline - request.first_sent <= MAX_RETRANSMIT_ELAPSED:
            request.interval *= RTO_MULTIPLIER
            if request.authenticated:
                self._resend_authenticated(request, now, fresh_backoff=False)
            else:
                request.deadline = now + request.interval
                self._requests[self._tid(request)] = request
                self._transmits.append(Transmit(None, request.dst, request.raw))
            return
        self.counters[f"timeout_{_method_name(request).lower()}"] += 1
        logger.debug(
            "relay %s: %s to %s timed out", self.relay_id, _method_name(request), request.dst
        )
        if request.method == Method.BINDING:
            if self._active is None and not self._in_flight(Method.BINDING):
                self._free(NO_RESPONSE)
        elif request.method == Method.REFRESH:
            if not request.delete:
                self._invalidate()
                self._active = None
        elif request.method == Method.CHANNEL_BIND:
            assert request.channel is not None
            channel = self._channels.get(request.channel)
            if channel is not None:
                if channel.bound:
                    channel.in_flight = False
                    channel.data_since_bind = False  # re-armed by the next received data
                else:
                    self._forget_channel(request.channel)

    @staticmethod
    def _tid(request: _Request) -> bytes:
        return request.raw[8:20]

    def poll_timeout(self) -> float | None:
        if self.is_freed:
            return None
        deadlines = [r.deadline for r in self._requests.values()]
        if self._allocate_retry_at is not None:
            deadlines.append(self._allocate_retry_at)
        if self._lifetime is not None:
            deadlines.append(self._lifetime[0] + self._lifetime[1])
            if not self._in_flight(Method.REFRESH):
                deadlines.append(self._refresh_at())
        if self._relays and self._active is not None:
            due = self._rebind_due
            while due:
                deadline, number, bound_at = due[0]
                channel = self._channels.get(number)
                if (channel is not None and channel.bound_at == bound_at
                        and self._channel_needs_rebind(channel)):
                    deadlines.append(deadline)
                    break
                heapq.heappop(due)  # stale: rebound, forgotten, or rebind in flight
        return min(deadlines, default=None)

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> AllocationEvent | None:
        return self._events.popleft() if self._events else None

    # ---- internals ------------------------------------------------------------------------

    def _note_data_since_bind(self, number: int, channel: _Channel) -> None:
        """First data since the channel's bind: it must be re-bound before it expires."""
        channel.data_since_bind = True
        heapq.heappush(
            self._rebind_due, (channel.bound_at + CHANNEL_REFRESH_AGE, number, channel.bound_at)
        )

    @staticmethod
    def _channel_needs_rebind(channel: _Channel) -> bool:
        return channel.bound and channel.data_since_bind and not channel.in_flight

    def _refresh_at(self) -> float:
        assert self._lifetime is not None
        return self._lifetime[0] + self._lifetime[1] / 2

    def _in_flight(self, method: int) -> bool:
        return any(r.method == method for r in self._requests.values())

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[reason] += 1
        logger.debug("relay %s: dropped response (%s) %s", self.relay_id, reason, detail)

    def _free(self, reason: str) -> None:
        self._invalidate()
        self._requests.clear()
        self._key = None
        self._buffered_bindings.clear()
        self.is_freed = True
        self._events.append(AllocationFailed(reason))
        logger.warning("relay %s: allocation freed: %s", self.relay_id, reason)

    def _invalidate(self) -> None:
        """Forget the allocation: relay candidates, lifetime, channels, TURN transactions."""
        for family in (4, 6):
            addr = self._relays.pop(family, None)
            if addr is not None:
                self._events.append(CandidateRemoved("relay", addr))
        self._lifetime = None
        self._channels.clear()
        self._channel_by_peer.clear()
        self._rebind_due.clear()
        self._requests = {tid: r for tid, r in self._requests.items() if r.method == Method.BINDING}

    def _send_bindings(self, now: float) -> None:
        for server in self._servers:
            msg = StunMessage(Method.BINDING, MessageClass.REQUEST, self._rng.randbytes(12))
            msg.add(Attr.SOFTWARE, self._software)
            raw = encode(msg)
            self._requests[msg.transaction_id] = _Request(
                method=Method.BINDING,
                dst=server,
                raw=raw,
                attributes=msg.attributes,
                authenticated=False,
                carried_nonce=False,
                first_sent=now,
                deadline=now + INITIAL_RTO,
                interval=INITIAL_RTO,
            )
            self._transmits.append(Transmit(None, server, raw))

    def _send_allocate(self, now: float) -> None:
        # A new allocation: made with the newest credentials the portal gave.
        self._adopt_next_credentials()
        self._send_authenticated(
            Method.ALLOCATE,
            [
                (Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP),
                (Attr.ADDITIONAL_ADDRESS_FAMILY, ADDITIONAL_FAMILY_IPV6),
            ],
            now,
        )

    def _send_refresh(self, now: float) -> None:
        self._send_authenticated(
            Method.REFRESH,
            [
                (Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP),
                (Attr.ADDITIONAL_ADDRESS_FAMILY, ADDITIONAL_FAMILY_IPV6),
            ],
            now,
        )

    def _send_delete(self, now: float, *, reallocate: bool) -> None:
        self._send_authenticated(
            Method.REFRESH,
            [
                (Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP),
                (Attr.ADDITIONAL_ADDRESS_FAMILY, ADDITIONAL_FAMILY_IPV6),
                (Attr.LIFETIME, b"\x00\x00\x00\x00"),
            ],
            now,
            delete=True,
            reallocate=reallocate,
        )

    def _send_channel_bind(self, peer: Address, number: int, now: float) -> None:
        # XOR-PEER-ADDRESS of an IPv6 peer depends on the transaction id: added on every send.
        if self._send_authenticated(
            Method.CHANNEL_BIND,
            [(Attr.CHANNEL_NUMBER, (number << 16).to_bytes(4, "big"))],
            now,
            peer=peer,
            channel=number,
        ):
            self._channels[number].in_flight = True

    def _send_authenticated(
        self,
        method: int,
        attributes: list[tuple[int, bytes]],
        now: float,
        *,
        peer: Address | None = None,
        channel: int | None = None,
        delete: bool = False,
        reallocate: bool = False,
    ) -> bool:
        if self._active is None or self._key is None:
            return False
        rejected = self._rejected_attributes.get(method)
        if rejected:
            attributes = [a for a in attributes if a[0] not in rejected]
        request = _Request(
            method=method,
            dst=self._active,
            raw=b"",
            attributes=attributes,
            authenticated=True,
            carried_nonce=False,
            first_sent=now,
            deadline=now,
            interval=INITIAL_RTO,
            peer=peer,
            channel=channel,
            delete=delete,
            reallocate=reallocate,
        )
        self._resend_authenticated(request, now, fresh_backoff=True)
        return True

    def _resend_authenticated(self, request: _Request, now: float, *, fresh_backoff: bool) -> None:
        """(Re)send with a new transaction id and the current nonce."""
        if self._active is None or self._key is None:
            return
        if fresh_backoff:
            request.first_sent = now
            request.interval = INITIAL_RTO
        msg = StunMessage(request.method, MessageClass.REQUEST, self._rng.randbytes(12))
        if request.peer is not None:
            msg.add_xor_address(Attr.XOR_PEER_ADDRESS, request.peer)
        msg.attributes.extend(request.attributes)
        msg.add(Attr.SOFTWARE, self._software)
        if self._nonce is None:
            # No nonce yet: go without credentials to get the 401 challenge. (Signing without
            # a NONCE draws 400 from RFC 5389 servers such as coturn, RFC 5389 §10.2.2.)
            request.raw = encode(msg)
        else:
            msg.add_str(Attr.USERNAME, self._username)
            msg.add_str(Attr.REALM, self._realm)
            msg.add_str(Attr.NONCE, self._nonce)
            request.raw = encode(msg, integrity_key=self._key)
        request.dst = self._active
        request.carried_nonce = self._nonce is not None
        request.deadline = now + request.interval
        self._requests[msg.transaction_id] = request
        self._transmits.append(Transmit(None, request.dst, request.raw))
