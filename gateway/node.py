"""The gateway's connectivity core: keys, relays, one ICE agent per client, demultiplexing.

Theory of operation (Firezone's rust/connlib/snownet/src/node.rs):

* The node owns the static X25519 key pair, the node-wide handshake rate limiter, one
  TURN :class:`~gateway.turn.allocation.Allocation` per relay and one :class:`Connection`
  (ICE agent + WireGuard parameters) per client, keyed by client id.
* Every received datagram enters through :meth:`Node.handle_datagram`. STUN from a relay
  goes to that relay's allocation; ChannelData from a relay is unwrapped and handled as if
  it came from the peer; STUN goes to the ICE agent that accepts it; WireGuard is returned
  to the caller as :class:`WireGuardDatagram` naming the client, because the WireGuard
  session itself lives in the client's PeerActor. It is routed by receiver index, and an
  initiation (which has none) by its source, if the client's ICE agent verified traffic
  from there: an address a client merely signals routes nothing.
* TURN channels for a client's candidates are bounded per connection and per relay.
* Local candidates: host candidates are learned from the local address each datagram
  arrived on; server-reflexive and relayed candidates come from the allocations. New
  candidates are signalled per client as :class:`CandidatesAdded` (the shell turns them
  into ``broadcast_ice_candidates``).
* Once ICE nominates a pair, :class:`PathChanged` tells the shell how to reach the client:
  directly, or through a relay channel. WireGuard datagrams produced before that are
  buffered by the peer (ring of 10, as rust/connlib/snownet/src/node.rs).
* :meth:`Node.reset` rotates the key and forgets every connection and allocation; the
  caller rebinds its sockets and reconnects the portal with the new public key.

Sans-IO: bytes, ``now`` and portal commands in; transmits, events and deadlines out.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import itertools
import logging
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.demux import INDEX_SHIFT, MAX_DATAGRAM_PAYLOAD, DatagramKind, classify
from gateway.drops import Drop, Event
from gateway.errors import MalformedPacket
from gateway.ice.agent import (
    MAX_REMOTE_CANDIDATES,
    Disconnected,
    IceAgent,
    Nominated,
    PeerReflexive,
)
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.slack import fire_at
from gateway.stun.message import MessageClass
from gateway.stun.message import parse as parse_stun
from gateway.turn.allocation import (
    Allocation,
    AllocationFailed,
    CandidateAdded,
    CandidateRemoved,
)
from gateway.types import Address, Rng, Transmit, format_address
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import message_type, receiver_index

log = logging.getLogger(__name__)

#: A connection fails if no remote candidate arrived this long after creation
#: (``CANDIDATE_TIMEOUT`` in rust/connlib/snownet/src/node.rs).
CANDIDATE_TIMEOUT = 10.0
#: TURN channels one connection may ask for on a signalled candidate's or a check's behalf
#: (1.4 binds one per non-host candidate, unbounded; a client needs about four). Refilled
#: when the client asks again with the same credentials (it roamed). A nominated relayed
#: path always gets its channel.
MAX_CHANNELS_PER_CONNECTION = 16
#: Channels all live connections together may ask one relay for, short of a nominated
#: path: an allocation has 4,096 numbers (``gateway/turn/allocation.py``), shared by every
#: client, and a quarter stays for nominated paths.
MAX_CANDIDATE_CHANNELS_PER_RELAY = 3072
#: Lines of one ``ice_candidates``/``invalidate_ice_candidates`` message looked at: twice
#: what a connection keeps; the rest is counted, not parsed.
MAX_CANDIDATE_LINES = 2 * MAX_REMOTE_CANDIDATES


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class DirectPath:
    """Send straight from our socket ``local`` (a host candidate base) to ``remote``."""

    local: Address
    remote: Address

    def describe(self) -> str:
        return "direct"


@dataclass(frozen=True, slots=True)
class RelayedPath:
    """Wrap in ChannelData ``channel`` and send to the relay ``server``."""

    relay_id: str
    server: Address
    channel: int
    remote: Address

    def describe(self) -> str:
        return f"relay:{self.relay_id}"


Path = DirectPath | RelayedPath


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class CandidatesAdded:
    client_id: uuid.UUID
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CandidatesInvalidated:
    client_id: uuid.UUID
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PathChanged:
    client_id: uuid.UUID
    path: Path


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    client_id: uuid.UUID
    reason: str


NodeEvent = CandidatesAdded | CandidatesInvalidated | PathChanged | ConnectionFailed


@dataclass(frozen=True, slots=True)
class WireGuardDatagram:
    """A WireGuard datagram for the session of ``client_id`` (received from ``src``)."""

    client_id: uuid.UUID
    datagram: bytes
    src: Address


# --------------------------------------------------------------------------- upsert results


@dataclass(frozen=True, slots=True)
class ConnectionCreated:
    """A new connection: the shell (re)starts the client's WireGuard session with these."""

    client_id: uuid.UUID
    local_index: int
    peer_public: bytes
    preshared_key: bytes
    local_credentials: IceCredentials
    replaced: bool


@dataclass(frozen=True, slots=True)
class ConnectionReused:
    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class NoTurnServers:
    """No relay known: the caller must not reply and should re-fetch ``init``
    (rust/gateway/src/eventloop.rs)."""


UpsertResult = ConnectionCreated | ConnectionReused | NoTurnServers


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A relay as the node needs it: merged dual-stack entry with long-term credentials."""

    relay_id: str
    addresses: tuple[Address, ...]
    username: str
    password: str

    def __repr__(self) -> str:
        return f"TurnServer({self.relay_id}, {self.addresses})"


# --------------------------------------------------------------------------- connection


@dataclass(slots=True)
class Connection:
    client_id: uuid.UUID
    local_credentials: IceCredentials
    peer_public: bytes
    agent: IceAgent
    relay_id: str
    local_index: int
    created_at: float
    got_remote_candidate: bool = False
    path: Path | None = None
    nominated: tuple[Candidate, Address] | None = None
    failed: str | None = None
    #: Its remote candidates' addresses (signalled or learned; at most the agent's 100):
    #: our checks go there, and STUN responses are routed by them.
    remote_addresses: set[Address] = field(default_factory=set)
    #: Addresses ICE traffic was verified from, and the nominated one: only these route
    #: handshake initiations here (``decapsulate`` in rust/connlib/snownet/src/node.rs). A subset
    #: of what the agent ``accepts_from`` (at most its 64 seen addresses and the nominated one).
    seen: set[Address] = field(default_factory=set)
    #: (relay id, peer) channels this connection asked for, and what is left of its budget.
    channels: set[tuple[str, Address]] = field(default_factory=set)
    channel_budget: int = MAX_CHANNELS_PER_CONNECTION
    #: After a reuse, remote candidates are accepted again until then (roaming clients).
    accept_candidates_until: float = 0.0
    idle: bool = False
    #: The deadline this connection is queued under in the node's timer heap...
    scheduled: float | None = None
    #: ...and the cores' own deadline it was derived from (with slack, ``gateway.slack``).
    due: float | None = None

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        if self.path is None:
            return "connecting"
        return "idle" if self.idle else "connected"


class Node:
    """The gateway's snownet node. See the module docstring for the contract."""

    def __init__(self, *, rng: Rng, now: float, static: StaticKeyPair | None = None) -> None:
        self._rng = rng
        self.static = static or StaticKeyPair.generate(rng)
        self.rate_limiter = HandshakeRateLimiter(self.static.public, rng)
        self._allocations: dict[str, Allocation] = {}
        #: Replaced allocations finishing their delete (answers routed by transaction id),
        #: and the relays whose new allocation waits for that.
        self._deleting: list[Allocation] = []
        self._deferred: dict[str, TurnServer] = {}
        self._relay_servers: set[Address] = set()
        self._server_to_relay: dict[Address, str] = {}
        self._connections: dict[uuid.UUID, Connection] = {}
        self._by_index: dict[int, uuid.UUID] = {}
        # Demultiplexing indexes, so a datagram costs O(1) connections, not O(clients):
        # STUN requests by our ICE ufrag, responses by the address our checks went to.
        self._by_ufrag: dict[str, list[Connection]] = {}
        self._by_remote: dict[Address, list[Connection]] = {}
        # WireGuard initiations (no receiver index) by an address ICE traffic came from.
        self._by_seen: dict[Address, list[Connection]] = {}
        #: relay id -> channels the live connections asked it for (bounded, see above).
        self._relay_channels: Counter[str] = Counter()
        #: relay id -> connections nominated on it that wait for their channel to be bound.
        self._awaiting_channel: dict[str, dict[uuid.UUID, Connection]] = {}
        self._host_candidates: dict[Address, Candidate] = {}
        self._srflx_candidates: dict[Address, Candidate] = {}
        self._transmits: deque[Transmit] = deque()
        self._events: deque[NodeEvent] = deque()
        # Per-connection deadlines: (deadline, tie-breaker, client id). Entries go stale
        # when a connection reschedules or disappears and are skipped lazily, so timers
        # cost O(log n) per connection touched instead of O(n) per message.
        self._timers: list[tuple[float, int, uuid.UUID]] = []
        self._timer_seq = itertools.count()
        self._pending_added: dict[uuid.UUID, list[str]] = {}
        self._pending_invalidated: dict[uuid.UUID, list[str]] = {}
        self.counters: Counter[str] = Counter()
        self._now = now

    # ------------------------------------------------------------------ identity

    @property
    def public_key(self) -> bytes:
        return self.static.public

    @property
    def software(self) -> str:
        """The STUN SOFTWARE value: a session id derived from the public key
        (rust/connlib/snownet/src/node.rs)."""
        session = hashlib.sha256(b"SESSION-ID" + self.static.public).hexdigest().upper()
        return f"snownet; session={session}"

    def reset(self, now: float) -> list[uuid.UUID]:
        """Rotate the static key and forget every connection, allocation and candidate.

        Returns the ids of the closed connections. The caller must rebind its sockets (relays
        identify allocations by 5-tuple) and reconnect the portal with the new key (README.rst,
        "Reset and key rotation").
        """
        closed = list(self._connections)
        self._connections.clear()
        self._by_index.clear()
        self._by_ufrag.clear()
        self._by_remote.clear()
        self._by_seen.clear()
        self._relay_channels.clear()
        self._awaiting_channel.clear()
        self._allocations.clear()
        self._deleting.clear()
        self._deferred.clear()
        self._server_to_relay.clear()
        self._relay_servers.clear()
        self._host_candidates.clear()
        self._srflx_candidates.clear()
        self._transmits.clear()
        self._events.clear()
        self._timers.clear()
        self._pending_added.clear()
        self._pending_invalidated.clear()
        self.static = StaticKeyPair.generate(self._rng)
        self.rate_limiter = HandshakeRateLimiter(self.static.public, self._rng)
        self.counters[Event.RESETS] += 1
        log.info("node reset: key rotated, %d connection(s) closed", len(closed))
        return closed

    def shutdown(self, now: float) -> None:
        """Graceful stop: delete every TURN allocation (REFRESH lifetime 0) so relays free
        them now instead of at expiry; the caller sends the resulting transmits."""
        for allocation in self._allocations.values():
            allocation.deallocate(now)
            while (tx := allocation.poll_transmit()) is not None:
                self._transmits.append(tx)

    # ------------------------------------------------------------------ relays

    def relay_servers(self) -> frozenset[Address]:
        return frozenset(self._relay_servers)

    def update_relays(
        self, removed: Iterable[str], added: Iterable[TurnServer], now: float
    ) -> None:
        """Apply ``init``/``relays_presence`` (``update_relays`` in
        rust/connlib/snownet/src/node.rs), except that a relay whose only change is its credentials
        keeps its allocation (see the comment below)."""
        for relay_id in removed:
            self._deferred.pop(relay_id, None)
            if relay_id in self._allocations:
                log.info("relay %s removed", relay_id)
                self._remove_allocation(relay_id, "relay disconnected", now)
        seen: set[str] = set()
        for relay in added:
            seen.add(relay.relay_id)
            if relay.relay_id in self._deferred:  # still waiting for the old one's delete
                self._deferred[relay.relay_id] = relay
                continue
            current = self._allocations.get(relay.relay_id)
            if current is not None and current.same_config(
                relay.addresses, relay.username, relay.password
            ):
                log.debug("skipping known TURN server %s", relay.relay_id)
                continue
            if (
                current is not None
                and not current.is_freed
                and current.same_servers(relay.addresses)
            ):
                # Only the credentials changed, as on every portal reconnect (the portal
                # draws fresh ones for each init). Replacing the allocation (1.4 does)
                # would withdraw its relayed candidate and fail every connection whose
                # pair uses it, though the relay and its allocation are fine: it is kept,
                # and takes the new credentials when it next allocates.
                current.update_credentials(relay.username, relay.password, now)
                self._drain_allocation(current, now)
                continue
            if current is not None:
                # Other server addresses (or a freed allocation): replaced. The active
                # server may be among the new ones, and a relay that binds allocations to
                # the username (coturn does) refuses a new ALLOCATE on the same 5-tuple
                # until the old allocation is gone, so delete it with its own credentials;
                # it stays around, for its own transactions only, until the delete is done,
                # and the new allocation starts after that.
                current.deallocate(now)
                while (tx := current.poll_transmit()) is not None:
                    self._transmits.append(tx)
                self._remove_allocation(relay.relay_id, "relay addresses changed", now)
                if current.busy:
                    self._deleting.append(current)
                    self._deferred[relay.relay_id] = relay
                    self._refresh_relay_servers()
                    continue
            self._deferred.pop(relay.relay_id, None)
            self._start_allocation(relay, now)
        for relay_id, allocation in list(self._allocations.items()):
            if relay_id not in seen:
                allocation.refresh(now)
                self._drain_allocation(allocation, now)
        self._flush_candidate_events()  # a removed relay's invalidations, in this step

    def _start_allocation(self, relay: TurnServer, now: float) -> None:
        log.info("allocating on relay %s at %s", relay.relay_id, relay.addresses)
        allocation = Allocation(
            relay_id=relay.relay_id,
            servers=relay.addresses,
            username=relay.username,
            password=relay.password,
            software=self.software,
            rng=self._rng,
            now=now,
        )
        self._allocations[relay.relay_id] = allocation
        for server in allocation.server_addresses():
            self._server_to_relay[server] = relay.relay_id
        self._refresh_relay_servers()
        # Connections that chose this relay while it was being replaced had nowhere to
        # bind their channels; the allocation buffers the binds until it is made.
        for conn in self._connections.values():
            if conn.relay_id == relay.relay_id and conn.path is None:
                for relay_id, peer in conn.channels:
                    if relay_id == relay.relay_id:
                        allocation.bind_channel(peer, now)
        self._drain_allocation(allocation, now)

    def _refresh_relay_servers(self) -> None:
        """Every address relay traffic may come from, including allocations being deleted."""
        servers = set(self._server_to_relay)
        for deleting in self._deleting:
            servers |= deleting.server_addresses()
        self._relay_servers = servers

    def _remove_allocation(self, relay_id: str, reason: str, now: float) -> None:
        allocation = self._allocations.pop(relay_id, None)
        if allocation is None:
            return
        for server in allocation.server_addresses():
            self._server_to_relay.pop(server, None)
        self._refresh_relay_servers()
        relayed = set(allocation.relay_addresses())
        for conn in list(self._connections.values()):
            for address in relayed:
                if conn.agent.invalidate_local_candidate(address):  # only if it was given
                    self._queue_invalidated(conn.client_id, Candidate.relay(address, relay_id))
            if isinstance(conn.path, RelayedPath) and conn.path.relay_id == relay_id:
                self._fail(conn, f"relay {relay_id} gone: {reason}")
            else:
                self._drain_agent(conn, now)

    def host_candidates(self) -> list[str]:
        """Local addresses learned from received datagrams (observability)."""
        return sorted(format_address(address) for address in self._host_candidates)

    def relays(self) -> list[dict[str, object]]:
        """Observability for ``status``."""
        return [
            {
                "id": relay_id,
                "server": _format(allocation.active_server()),
                "relay_addresses": [format_address(a) for a in allocation.relay_addresses()],
                "state": "freed" if allocation.is_freed else (
                    "allocated" if allocation.relay_addresses() else "allocating"
                ),
            }
            for relay_id, allocation in self._allocations.items()
        ]

    # ------------------------------------------------------------------ connections

    def upsert_connection(
        self,
        client_id: uuid.UUID,
        *,
        client_public_key: bytes,
        preshared_key: bytes,
        local: IceCredentials,
        remote: IceCredentials,
        now: float,
    ) -> UpsertResult:
        """``authorize_flow``: reuse iff the local ICE credentials match, else replace
        (``upsert_connection`` in rust/connlib/snownet/src/node.rs)."""
        existing = self._connections.get(client_id)
        if existing is not None and existing.failed is None and existing.local_credentials == local:
            log.debug("already got a connection for %s", client_id)
            self._resignal(existing, now)
            return ConnectionReused(client_id)
        return self._create(client_id, client_public_key, preshared_key, local, remote, now)

    def accept_connection(
        self,
        client_id: uuid.UUID,
        *,
        client_public_key: bytes,
        preshared_key: bytes,
        remote: IceCredentials,
        now: float,
    ) -> UpsertResult:
        """Legacy ``request_connection``: always a new connection with random local creds."""
        local = IceCredentials.random(self._rng)
        return self._create(client_id, client_public_key, preshared_key, local, remote, now)

    def _create(
        self,
        client_id: uuid.UUID,
        client_public_key: bytes,
        preshared_key: bytes,
        local: IceCredentials,
        remote: IceCredentials,
        now: float,
    ) -> UpsertResult:
        usable = [rid for rid, a in self._allocations.items() if not a.is_freed]
        # A relay whose replacement waits for the old allocation's delete is still a
        # known relay (rust/connlib/snownet/src/node.rs: entries exist before the allocation
        # succeeds).
        usable += [rid for rid in self._deferred if rid not in self._allocations]
        if not usable:
            self.counters[Event.NO_TURN_SERVERS] += 1
            log.warning("no TURN servers connected; cannot create connection for %s", client_id)
            return NoTurnServers()
        relay_id = self._rng.choice(sorted(usable))
        replaced = self._connections.pop(client_id, None)
        if replaced is not None:
            self._by_index.pop(replaced.local_index >> INDEX_SHIFT, None)
            self._unindex(replaced)
        agent = IceAgent(controlling=False, local=local, remote=remote, rng=self._rng, now=now)
        conn = Connection(
            client_id=client_id,
            local_credentials=local,
            peer_public=client_public_key,
            agent=agent,
            relay_id=relay_id,
            local_index=self._new_index(client_id),
            created_at=now,
        )
        self._connections[client_id] = conn
        self._by_ufrag.setdefault(local.ufrag, []).append(conn)
        for host in self._host_candidates.values():
            self._add_local(conn, host)
        for srflx in self._srflx_candidates.values():
            self._queue_added(client_id, srflx)  # signalled only; we send from the base
        allocation = self._allocations.get(relay_id)  # None while it is being replaced
        if allocation is not None:
            for address in allocation.relay_addresses():
                self._add_local(conn, Candidate.relay(address, relay_id))
        self._drain_agent(conn, now)
        self._flush_candidate_events()
        self.counters[Event.CONNECTIONS_CREATED] += 1
        return ConnectionCreated(
            client_id=client_id,
            local_index=conn.local_index,
            peer_public=client_public_key,
            preshared_key=preshared_key,
            local_credentials=local,
            replaced=replaced is not None,
        )

    def _resignal(self, conn: Connection, now: float) -> None:
        """A client asking again with the same credentials may have roamed (same key, new
        socket): it needs our candidates again, and we take its new ones for a while."""
        for candidate in conn.agent.local_candidates:
            self._queue_added(conn.client_id, candidate)
        for srflx in self._srflx_candidates.values():
            self._queue_added(conn.client_id, srflx)
        conn.accept_candidates_until = now + CANDIDATE_TIMEOUT
        # Its new candidates need channels again: a fresh budget, and only the nominated
        # path's channel is still accounted to it.
        self._release_channels(conn, self._nominated_channel(conn))
        conn.channel_budget = MAX_CHANNELS_PER_CONNECTION
        self._flush_candidate_events()

    def _new_index(self, client_id: uuid.UUID) -> int:
        while True:
            idx = self._rng.getrandbits(24)
            if idx and idx not in self._by_index:
                self._by_index[idx] = client_id
                return idx << INDEX_SHIFT

    def remove_connection(self, client_id: uuid.UUID, reason: str) -> bool:
        """Forget a connection (its peer failed or was stopped). No event is emitted."""
        conn = self._connections.pop(client_id, None)
        if conn is None:
            return False
        self._by_index.pop(conn.local_index >> INDEX_SHIFT, None)
        self._unindex(conn)
        log.info("connection to %s removed: %s", client_id, reason)
        return True

    def set_idle(self, client_id: uuid.UUID, idle: bool, now: float) -> None:
        """Connected <-> Idle: idle connections use the idle STUN timings
        (rust/connlib/snownet/src/node.rs)."""
        conn = self._connections.get(client_id)
        if conn is None or conn.path is None or conn.idle == idle:
            return
        conn.idle = idle
        conn.agent.set_idle(idle, now)
        self._drain_agent(conn, now)

    def note_channel_data(self, server: Address, number: int, now: float) -> None:
        """ChannelData from ``server`` on ``number`` was unwrapped outside the node."""
        relay_id = self._server_to_relay.get(server)
        if relay_id is not None:
            self._allocations[relay_id].note_channel_data(number, now)

    def connection(self, client_id: uuid.UUID) -> Connection | None:
        return self._connections.get(client_id)

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def client_for_index(self, index: int) -> uuid.UUID | None:
        return self._by_index.get(index >> INDEX_SHIFT)

    def add_remote_candidates(
        self, client_id: uuid.UUID, candidates: Iterable[str], now: float
    ) -> None:
        """``ice_candidates``: only while the connection is still connecting
        (rust/connlib/snownet/src/node.rs)."""
        conn = self._connections.get(client_id)
        if conn is None:
            self.counters[Drop.CANDIDATES_FOR_UNKNOWN_CLIENT] += 1
            return
        if conn.path is not None and now >= conn.accept_candidates_until:
            self.counters[Drop.CANDIDATES_AFTER_NOMINATION] += 1
            return
        lines = list(candidates)
        bad: ValueError | None = None
        for n, line in enumerate(lines):
            if n >= MAX_CANDIDATE_LINES or conn.agent.remote_candidates_full:
                # Bounded (``gateway/ice/agent.py``): the rest is counted, not parsed.
                self.counters[Drop.REMOTE_CANDIDATES_OVER_LIMIT] += len(lines) - n
                log.warning("client %s signalled more candidates than kept; %d ignored",
                            client_id, len(lines) - n)
                break
            try:
                candidate = Candidate.parse(line)
            except ValueError as exc:
                self.counters[Drop.BAD_REMOTE_CANDIDATE] += 1
                bad = exc
                continue
            conn.got_remote_candidate = True
            if not conn.agent.add_remote_candidate(candidate):
                continue  # a duplicate (already indexed) or unusable
            self._index_remote(conn, candidate.address)
            if candidate.kind != "host":
                # So that the client's relayed and reflexive candidates reach our relayed
                # one (rust/connlib/snownet/src/node.rs), within the connection's and the relay's
                # budget.
                self._bind_channel(conn, conn.relay_id, candidate.address, now)
        if bad is not None:  # one line per message, however many were bad
            log.warning("ignoring unparseable candidate(s) from %s: %s", client_id, bad)
        self._drain_agent(conn, now)

    def remove_remote_candidates(
        self, client_id: uuid.UUID, candidates: Iterable[str], now: float
    ) -> None:
        """``invalidate_ice_candidates``: in any state; may disconnect the agent
        (rust/connlib/snownet/src/node.rs)."""
        conn = self._connections.get(client_id)
        if conn is None:
            return
        lines = list(candidates)
        if len(lines) > MAX_CANDIDATE_LINES:
            self.counters[Drop.INVALIDATIONS_OVER_LIMIT] += len(lines) - MAX_CANDIDATE_LINES
            del lines[MAX_CANDIDATE_LINES:]
        for line in lines:
            try:
                candidate = Candidate.parse(line)
            except ValueError:
                self.counters[Drop.BAD_REMOTE_CANDIDATE] += 1
                continue
            address = candidate.address
            if address not in conn.remote_addresses and address not in conn.seen:
                continue  # nothing of ours there: no scan of the agent's pairs
            conn.agent.invalidate_remote_candidate(candidate)
            if not conn.agent.has_remote_candidate(address):
                conn.remote_addresses.discard(address)
                _discard(self._by_remote, address, conn)
        self._prune_seen(conn)
        self._drain_agent(conn, now)

    # ------------------------------------------------------------------ datagrams

    def handle_datagram(
        self, local: Address, src: Address, data: bytes, now: float
    ) -> WireGuardDatagram | None:
        """Demultiplex one received datagram (``decapsulate`` in rust/connlib/snownet/src/node.rs).
        Never raises on bad input."""
        self._now = now
        if len(data) > MAX_DATAGRAM_PAYLOAD:
            self.counters[Drop.OVERSIZED_DATAGRAM] += 1
            return None
        if not self._learn_host_candidate(local, now):
            return None
        kind = classify(data, src, self._relay_servers)
        if kind is DatagramKind.STUN_FROM_RELAY:
            self._handle_relay_stun(data, src, local, now)
            return None
        if kind is DatagramKind.CHANNEL_DATA_FROM_RELAY:
            relay_id = self._server_to_relay.get(src)
            if relay_id is None:  # only an allocation being deleted uses that server
                self.counters[Drop.CHANNEL_DATA_DROPPED] += 1
                return None
            allocation = self._allocations[relay_id]
            unwrapped = allocation.decapsulate(data, src, now)
            self._drain_allocation(allocation, now)
            if unwrapped is None:
                self.counters[Drop.CHANNEL_DATA_DROPPED] += 1
                return None
            peer, payload, relayed = unwrapped
            return self._handle_peer_datagram(relayed, peer, payload, now, relayed=True)
        return self._handle_peer_datagram(local, src, data, now, kind=kind)

    def _handle_peer_datagram(
        self,
        local: Address,
        src: Address,
        data: bytes,
        now: float,
        *,
        relayed: bool = False,
        kind: DatagramKind | None = None,
    ) -> WireGuardDatagram | None:
        if kind is None:
            kind = classify(data, src, ())
        if kind is DatagramKind.STUN:
            self._handle_ice_stun(data, src, local, now)
            return None
        if kind is DatagramKind.WIREGUARD:
            client_id = self._route_wireguard(data, src)
            if client_id is None:
                self.counters[Drop.WIREGUARD_NO_CONNECTION] += 1
                return None
            return WireGuardDatagram(client_id, data, src)
        self.counters[Drop.GARBAGE_DATAGRAM] += 1
        return None

    def _route_wireguard(self, data: bytes, src: Address) -> uuid.UUID | None:
        """Responses, cookie replies and transport data by their receiver index; the rest
        (initiations) by their source, if ICE traffic was verified from it
        (rust/connlib/snownet/src/node.rs).

        Signalled candidates never route: a client could name another client's address and
        capture its handshakes. Among connections that saw ``src`` (only possible with
        spoofed checks) the one nominated on it wins, else the first.
        """
        mtype = message_type(data)
        if mtype in (2, 3, 4):
            index = receiver_index(data)
            if index is not None:
                client_id = self._by_index.get(index >> INDEX_SHIFT)
                if client_id is not None:
                    return client_id
        first: Connection | None = None
        for conn in self._by_seen.get(src, ()):
            if conn.failed is None and conn.agent.accepts_from(src):
                if conn.nominated is not None and conn.nominated[1] == src:
                    return conn.client_id
                if first is None:
                    first = conn
        return None if first is None else first.client_id

    def _handle_relay_stun(self, data: bytes, src: Address, local: Address, now: float) -> None:
        try:
            message = parse_stun(data)
        except MalformedPacket:
            self.counters[Drop.MALFORMED_STUN_FROM_RELAY] += 1
            return
        for deleting in self._deleting:
            if deleting.expects(message):
                deleting.handle_stun(message, data, src, local, now)
                self._drain_deleting(now)
                return
        relay_id = self._server_to_relay.get(src)
        if relay_id is None:
            self.counters[Drop.STUN_FROM_DELETED_RELAY] += 1
            return
        allocation = self._allocations[relay_id]
        allocation.handle_stun(message, data, src, local, now)
        self._drain_allocation(allocation, now)

    def _drain_deleting(self, now: float) -> None:
        """Send what replaced allocations still have to say; once a delete is done (or given
        up), start the allocation that waited for it."""
        for deleting in self._deleting:
            while (tx := deleting.poll_transmit()) is not None:
                self._transmits.append(tx)
            while deleting.poll_event() is not None:
                pass  # their candidates were withdrawn when they were replaced
        finished = [d for d in self._deleting if not d.busy]
        if not finished:
            return
        self._deleting = [d for d in self._deleting if d.busy]
        self._refresh_relay_servers()
        waiting = {d.relay_id for d in self._deleting}
        for done in finished:
            relay = self._deferred.get(done.relay_id)
            if relay is not None and done.relay_id not in waiting:
                del self._deferred[done.relay_id]
                self._start_allocation(relay, now)

    def _handle_ice_stun(self, data: bytes, src: Address, local: Address, now: float) -> None:
        try:
            message = parse_stun(data)
        except MalformedPacket:
            self.counters[Drop.MALFORMED_STUN] += 1
            return
        if message.cls == MessageClass.REQUEST:
            try:
                username = message.username() or ""
            except MalformedPacket:
                username = ""
            candidates = self._by_ufrag.get(username.partition(":")[0], ())
        else:
            candidates = self._by_remote.get(src, ())
        for conn in candidates:
            if conn.failed is None and conn.agent.accepts(message, data):
                conn.agent.handle_stun(message, data, src, local, now)
                if src not in conn.remote_addresses and conn.agent.has_remote_candidate(src):
                    self._index_remote(conn, src)  # learned: our checks go there now
                if conn.agent.accepts_from(src):  # verified, not merely addressed to us
                    self._index_seen(conn, src)
                self._drain_agent(conn, now)
                self._flush_candidate_events()
                return
        self.counters[Drop.STUN_NO_AGENT] += 1

    def _index_remote(self, conn: Connection, address: Address) -> None:
        if address not in conn.remote_addresses:
            conn.remote_addresses.add(address)
            self._by_remote.setdefault(address, []).append(conn)

    def _index_seen(self, conn: Connection, address: Address) -> None:
        if address not in conn.seen:
            conn.seen.add(address)
            self._by_seen.setdefault(address, []).append(conn)

    def _prune_seen(self, conn: Connection) -> None:
        """Forget addresses the agent no longer accepts (invalidated, or a former path)."""
        stale = [a for a in conn.seen if not conn.agent.accepts_from(a)]
        for address in stale:
            conn.seen.discard(address)
            _discard(self._by_seen, address, conn)

    def _unindex(self, conn: Connection) -> None:
        _discard(self._by_ufrag, conn.local_credentials.ufrag, conn)
        for address in conn.remote_addresses:
            _discard(self._by_remote, address, conn)
        for address in conn.seen:
            _discard(self._by_seen, address, conn)
        self._release_channels(conn, set())

    def _release_channels(self, conn: Connection, keep: set[tuple[str, Address]]) -> None:
        """Return ``conn``'s channel grants but ``keep`` to their relays' budgets (the
        channels themselves stay bound on the relay until they expire)."""
        for grant in conn.channels - keep:
            relay_id = grant[0]
            self._relay_channels[relay_id] -= 1
            if self._relay_channels[relay_id] <= 0:
                del self._relay_channels[relay_id]
        conn.channels &= keep

    def _nominated_channel(self, conn: Connection) -> set[tuple[str, Address]]:
        if conn.nominated is None or conn.nominated[0].relay_id is None:
            return set()
        return {(conn.nominated[0].relay_id, conn.nominated[1])}

    def _bind_channel(self, conn: Connection, relay_id: str, peer: Address, now: float) -> bool:
        """Ask ``relay_id`` for a channel to ``peer`` on ``conn``'s behalf, within budget.

        Bounded per connection and per relay (see the constants); refusals are counted.
        Made before the allocation exists, the grant is bound when it is made. (A
        nominated path's channel is asked for by ``_update_path``, outside the budget.)
        """
        grant = (relay_id, peer)
        if grant not in conn.channels:
            if conn.channel_budget <= 0:
                self.counters[Drop.CHANNEL_REFUSED_CONNECTION_BUDGET] += 1
                return False
            if self._relay_channels[relay_id] >= MAX_CANDIDATE_CHANNELS_PER_RELAY:
                self.counters[Drop.CHANNEL_REFUSED_RELAY_BUDGET] += 1
                return False
            conn.channel_budget -= 1
            conn.channels.add(grant)
            self._relay_channels[relay_id] += 1
        allocation = self._allocations.get(relay_id)
        if allocation is None:
            return False
        allocation.bind_channel(peer, now)
        self._drain_allocation(allocation, now)
        return True

    def _learn_host_candidate(self, local: Address, now: float) -> bool:
        if local in self._host_candidates or self._is_relayed_address(local):
            return True
        try:
            ip = ipaddress.ip_address(local[0])
        except ValueError:
            self.counters[Drop.BAD_LOCAL_ADDRESS] += 1
            return False
        # Invalid for ICE (rust/connlib/snownet/src/node.rs): unspecified, multicast, IPv4
        # broadcast and IPv4 link-local; an IPv6 link-local address is a host candidate like any
        # other.
        if ip.is_unspecified or ip.is_multicast or (
            isinstance(ip, ipaddress.IPv4Address)
            and (ip.is_link_local or ip == ipaddress.IPv4Address("255.255.255.255"))
        ):
            self.counters[Drop.INVALID_HOST_CANDIDATE] += 1
            return False
        candidate = Candidate.host(local)
        self._host_candidates[local] = candidate
        log.info("new host candidate %s", candidate.to_sdp())
        for conn in self._connections.values():
            self._add_local(conn, candidate)
            self._drain_agent(conn, now)
        self._flush_candidate_events()
        return True

    def _is_relayed_address(self, address: Address) -> bool:
        return any(address in a.relay_addresses() for a in self._allocations.values())

    # ------------------------------------------------------------------ timers

    def handle_timeout(self, now: float) -> None:
        self._now = now
        self.rate_limiter.handle_timeout(now)
        for allocation in list(self._allocations.values()):
            allocation.handle_timeout(now)
            self._drain_allocation(allocation, now)
        for deleting in self._deleting:
            deleting.handle_timeout(now)
        self._drain_deleting(now)
        due: dict[uuid.UUID, Connection] = {}
        while self._timers and self._timers[0][0] <= now:
            _, _, client_id = heapq.heappop(self._timers)
            conn = self._connections.get(client_id)
            if conn is not None and conn.failed is None:
                due[client_id] = conn
        for conn in due.values():
            conn.scheduled = None
            if conn.failed is not None:
                continue
            if not conn.got_remote_candidate and now - conn.created_at >= CANDIDATE_TIMEOUT:
                self._fail(conn, "no remote candidates received")
                continue
            conn.agent.handle_timeout(now)
            self._drain_agent(conn, now)
        self._flush_candidate_events()

    def poll_timeout(self) -> float | None:
        deadlines = [self.rate_limiter.poll_timeout()]
        deadlines += [a.poll_timeout() for a in self._allocations.values()]
        deadlines += [a.poll_timeout() for a in self._deleting]
        timers = self._timers
        while timers:
            deadline, _, client_id = timers[0]
            conn = self._connections.get(client_id)
            if conn is not None and conn.failed is None and conn.scheduled == deadline:
                deadlines.append(deadline)
                break
            heapq.heappop(timers)  # stale: rescheduled, failed or gone
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def _schedule(self, conn: Connection, now: float) -> None:
        deadline = conn.agent.poll_timeout()
        if not conn.got_remote_candidate:
            expiry = conn.created_at + CANDIDATE_TIMEOUT
            deadline = expiry if deadline is None else min(deadline, expiry)
        if deadline is None or (deadline == conn.due and conn.scheduled is not None):
            return  # nothing to do, or already queued for this deadline
        conn.due = deadline
        # Far deadlines (idle checks every 60 s) move onto the slack grid, so that one
        # wake-up serves every connection due within it instead of one each. Computed once
        # per deadline: recomputed later, with less lead, it would land elsewhere.
        slot = fire_at(deadline, now)
        if slot != conn.scheduled:
            conn.scheduled = slot
            heapq.heappush(self._timers, (slot, next(self._timer_seq), conn.client_id))

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> NodeEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ internals

    def _fail(self, conn: Connection, reason: str) -> None:
        if conn.failed is not None:
            return
        conn.failed = reason
        self._connections.pop(conn.client_id, None)
        self._by_index.pop(conn.local_index >> INDEX_SHIFT, None)
        self._unindex(conn)
        self.counters[Event.CONNECTIONS_FAILED] += 1
        log.info("connection to %s failed: %s", conn.client_id, reason)
        self._events.append(ConnectionFailed(conn.client_id, reason))

    def _add_local(self, conn: Connection, candidate: Candidate) -> None:
        if conn.agent.add_local_candidate(candidate):
            self._queue_added(conn.client_id, candidate)

    def _queue_added(self, client_id: uuid.UUID, candidate: Candidate) -> None:
        self._pending_added.setdefault(client_id, []).append(candidate.to_sdp())

    def _queue_invalidated(self, client_id: uuid.UUID, candidate: Candidate) -> None:
        self._pending_invalidated.setdefault(client_id, []).append(candidate.to_sdp())

    def _flush_candidate_events(self) -> None:
        """One event per client per processing step, sorted and de-duplicated
        (rust/gateway/src/eventloop.rs)."""
        for client_id, lines in self._pending_added.items():
            if client_id in self._connections:
                self._events.append(CandidatesAdded(client_id, tuple(sorted(set(lines)))))
        for client_id, lines in self._pending_invalidated.items():
            if client_id in self._connections:
                self._events.append(CandidatesInvalidated(client_id, tuple(sorted(set(lines)))))
        self._pending_added.clear()
        self._pending_invalidated.clear()

    def _drain_agent(self, conn: Connection, now: float) -> None:
        agent = conn.agent
        while (tx := agent.poll_transmit()) is not None:
            self._send_from(conn, tx, now)
        while (event := agent.poll_event()) is not None:
            if isinstance(event, Nominated):
                conn.nominated = (event.local, event.remote)
                self._prune_seen(conn)
                self._index_seen(conn, event.remote)
                self._update_path(conn, now)
            elif isinstance(event, PeerReflexive):
                # A verified check taught the agent a remote candidate: the client's
                # signalled ones may still be on their way through the portal, and must
                # not fail a connection that already works (``CANDIDATE_TIMEOUT`` in
                # rust/connlib/snownet/src/node.rs).
                conn.got_remote_candidate = True
            elif isinstance(event, Disconnected):
                self._fail(conn, f"ICE disconnected: {event.reason}")
                return
        if conn.failed is None:
            self._schedule(conn, now)

    def _update_path(self, conn: Connection, now: float) -> None:
        if conn.nominated is None:
            return
        local, remote = conn.nominated
        path: Path | None
        if local.kind == "relay" and local.relay_id is not None:
            allocation = self._allocations.get(local.relay_id)
            if allocation is None:
                self._fail(conn, f"nominated relay {local.relay_id} is gone")
                return
            channel = allocation.channel_for(remote)
            server = allocation.active_server()
            if channel is None or server is None:
                grant = (local.relay_id, remote)
                if grant not in conn.channels:
                    conn.channels.add(grant)
                    self._relay_channels[local.relay_id] += 1
                allocation.bind_channel(remote, now)
                while (tx := allocation.poll_transmit()) is not None:
                    self._transmits.append(tx)
                # PathChanged follows once the channel is confirmed (_drain_allocation).
                waiting = self._awaiting_channel.setdefault(local.relay_id, {})
                waiting[conn.client_id] = conn
                return
            path = RelayedPath(local.relay_id, server, channel, remote)
        else:
            path = DirectPath(local.base or local.address, remote)
        if path != conn.path:
            conn.path = path
            log.info("connection to %s uses %s path to %s", conn.client_id, path.describe(), remote)
            self._events.append(PathChanged(conn.client_id, path))

    def _send_from(self, conn: Connection, tx: Transmit, now: float) -> None:
        """Route an ICE transmit: from a relayed address it is wrapped in ChannelData.

        Without a channel the check is dropped and one is bound on demand, within the
        connection's budget (1.4 only drops it)."""
        if tx.src is not None:
            for allocation in self._allocations.values():
                if tx.src in allocation.relay_addresses():
                    wrapped = allocation.encapsulate(tx.dst, tx.payload, now)
                    if wrapped is None:
                        self._bind_channel(conn, allocation.relay_id, tx.dst, now)
                        self.counters[Drop.NO_CHANNEL] += 1
                    else:
                        self._transmits.append(wrapped)
                    return
        self._transmits.append(tx)

    def _drain_allocation(self, allocation: Allocation, now: float) -> None:
        while (tx := allocation.poll_transmit()) is not None:
            self._transmits.append(tx)
        while (event := allocation.poll_event()) is not None:
            self._on_allocation_event(allocation, event, now)
        if allocation.is_freed and self._allocations.get(allocation.relay_id) is allocation:
            self._remove_allocation(allocation.relay_id, "allocation freed", now)
        # Only the connections waiting for a channel on this relay: O(waiting), not O(N),
        # since this runs for every TURN message.
        waiting = self._awaiting_channel.pop(allocation.relay_id, None)
        for conn in (waiting or {}).values():
            if (
                self._connections.get(conn.client_id) is conn
                and conn.nominated is not None
                and conn.nominated[0].relay_id == allocation.relay_id
                and conn.path is None
            ):
                self._update_path(conn, now)  # waits again if still unbound
        self._flush_candidate_events()

    def _on_allocation_event(self, allocation: Allocation, event: object, now: float) -> None:
        relay_id = allocation.relay_id
        if isinstance(event, CandidateAdded):
            if event.kind == "srflx":
                base = event.base or event.address
                candidate = Candidate.srflx(event.address, base)
                self._srflx_candidates[event.address] = candidate
                log.info("server-reflexive candidate %s via relay %s", event.address, relay_id)
            else:
                candidate = Candidate.relay(event.address, relay_id)
                log.info("relayed candidate %s on relay %s", event.address, relay_id)
                for conn in self._connections.values():
                    if conn.relay_id == relay_id and conn.path is None:
                        self._add_local(conn, candidate)
                        self._drain_agent(conn, now)
        elif isinstance(event, CandidateRemoved):
            if event.kind == "srflx":
                self._srflx_candidates.pop(event.address, None)
                return
            candidate = Candidate.relay(event.address, relay_id)
            for conn in list(self._connections.values()):
                if conn.agent.invalidate_local_candidate(event.address):
                    self._queue_invalidated(conn.client_id, candidate)
                if isinstance(conn.path, RelayedPath) and conn.path.relay_id == relay_id:
                    self._fail(conn, f"relay candidate {event.address} invalidated")
        elif isinstance(event, AllocationFailed):
            log.warning("allocation on relay %s failed: %s", relay_id, event.reason)


def _format(address: Address | None) -> str | None:
    return None if address is None else format_address(address)


def _discard(index: dict[Any, list[Connection]], key: Any, conn: Connection) -> None:
    entries = index.get(key)
    if entries is not None:
        entries[:] = [c for c in entries if c is not conn]
        if not entries:
            del index[key]
