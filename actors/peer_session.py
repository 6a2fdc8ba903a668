"""One client's data path behind one lock, driven directly by the threads that own the I/O.

A pykka ``tell`` costs about as much as everything else a packet needs together, and a
hop to the PeerActor's thread adds a GIL hand-off per batch on top. So the data path does
not go through the PeerActor's mailbox: the UDP reader calls :meth:`PeerSession.from_network`,
the TUN reader calls :meth:`PeerSession.from_tun` and the Timer thread calls the session's
timeout, each on its own thread, serialised by the session's lock. The PeerActor owns the
session and feeds it the control messages (new WireGuard session, authorizations, path,
DNS answers) under the same lock.

The session is a thin shell over two sans-IO cores, :class:`gateway.wg.tunnel.Tunnel` and
:class:`gateway.peer.ClientOnGateway`, plus :class:`gateway.idle.IdleTracker`. Everything it
calls while holding the lock is non-blocking: ``sendto`` on non-blocking sockets, the TUN
writer's own short lock, ``tell``, and the Timer's lock (a leaf).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.clock import Clock
from actors.io.udp import UdpSockets
from actors.resolver import IPAddress
from actors.timer import CallTimer, Timer
from actors.tun import RegisterClient, TunWriter, UnregisterClient
from gateway.idle import IdleTracker
from gateway.node import DirectPath, Path, RelayedPath
from gateway.packet.nat import NAT_PORTS
from gateway.peer import ClientOnGateway, NeedsResolution, Reply, ResourceExpired
from gateway.resources import Resource
from gateway.turn.channel_data import encode_channel_data
from gateway.types import Address, Rng
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import (
    ConnectionExpired,
    Dropped,
    HandshakeCompleted,
    Tunnel,
    WriteToNetwork,
)

log = logging.getLogger("actors.peer")

#: WireGuard datagrams produced before ICE nominated a path (snownet.md §8.1).
PENDING_DATAGRAMS = 10
#: The client's configured persistent keepalive (snownet.md §5.1).
PERSISTENT_KEEPALIVE = 25.0

#: Called (on whatever thread noticed it) with a message for the node: PeerIdle, PeerFailed.
NodeNotify = Callable[[object], None]
#: Starts a DNS lookup whose answer the owner feeds back through ``resolved_locked``.
ResolveRequest = Callable[[uuid.UUID, str, tuple[IPAddress, ...], bool], None]


@dataclass(slots=True)
class Figures:
    """What ``/metrics`` shows of clients: summed over live and closed sessions."""

    paths: Counter[str]
    rx_bytes: int = 0
    tx_bytes: int = 0
    handshakes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def add(self, other: Figures) -> None:
        self.rx_bytes += other.rx_bytes
        self.tx_bytes += other.tx_bytes
        self.handshakes += other.handshakes
        self.drops.update(other.drops)


class SessionRegistry:
    """Every live session, and the totals of the closed ones, for ``/metrics``.

    A scrape reads each session's figures without its lock (``PeerSession.figures``), so
    it costs no lock round with the data path; this registry's own lock is taken only when
    a session starts or closes and by the scrape, so a session's totals are never counted
    twice or missed while it moves from live to closed (counters stay monotonic).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[PeerSession] = weakref.WeakSet()
        self._closed = Figures(Counter())

    def register(self, session: PeerSession) -> None:
        with self._lock:
            self._live.add(session)

    def retire(self, session: PeerSession, final: Figures) -> None:
        with self._lock:
            if session in self._live:
                self._live.discard(session)
                self._closed.add(final)

    def figures(self) -> Figures:
        """Live sessions by path (``direct``, ``relay``, ``connecting``) and every total."""
        with self._lock:
            total = Figures(Counter())
            total.add(self._closed)
            for session in list(self._live):
                own = session.figures()
                total.paths[own.paths.most_common(1)[0][0]] += 1
                total.add(own)
        return total


#: The process's sessions (one gateway per process).
SESSIONS = SessionRegistry()


@dataclass(frozen=True, slots=True)
class PeerIdle:
    """Told to the NodeActor on Connected <-> Idle transitions (only then, never per packet)."""

    client_id: uuid.UUID
    idle: bool


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """Told to the NodeActor when the WireGuard session expired (snownet.md §8.4 cause 3),
    or when this client's PeerActor or data path failed (README, "Supervision")."""

    client_id: uuid.UUID
    reason: str
    #: The PeerActor it concerns: a report about an actor already replaced is stale.
    #: None: whichever is current.
    actor_urn: str | None = None


class PeerSession:
    """One client's WireGuard session, authorizations, filters and path; thread-safe."""

    #: The port range of the client's DNS-resource NAT (1.4's); ``devstack`` narrows it
    #: for the end-to-end test that exhausts it.
    nat_ports: tuple[int, int] = NAT_PORTS

    def __init__(
        self,
        *,
        client_id: uuid.UUID,
        tun: pykka.ActorRef[Any],
        tun_writer: TunWriter,
        sockets: UdpSockets,
        clock: Clock,
        rng: Rng,
        timer: Timer,
        notify_node: NodeNotify,
        icmp_prohibited: bool = False,
        registry: SessionRegistry = SESSIONS,
    ) -> None:
        self.client_id = client_id
        self.lock = threading.Lock()
        self._tun = tun
        self._tun_writer = tun_writer
        self._sockets = sockets
        self._clock = clock
        self._rng = rng
        self._notify_node = notify_node
        #: Set by the owning PeerActor: lookups answer through its mailbox.
        self.resolve: ResolveRequest = self._cannot_resolve
        self._icmp_prohibited = icmp_prohibited
        self._tunnel: Tunnel | None = None
        self._client: ClientOnGateway | None = None
        self._path: Path | None = None
        self._pending: deque[bytes] = deque(maxlen=PENDING_DATAGRAMS)
        self._wake = CallTimer(timer, self.on_timer)
        self._idle = IdleTracker()
        self._closed = False
        #: The owning PeerActor's urn (set by it), named in the failures this reports.
        self.owner: str | None = None
        self.counters: Counter[str] = Counter()  # drops by reason
        self.handshakes = 0
        #: bytes of WireGuard sessions replaced or expired (the Tunnel's own count is lost)
        self._retired_rx = 0
        self._retired_tx = 0
        #: odd while figures move between the tunnel/client and the session (see figures)
        self._figures_gen = 0
        self._registry = registry
        self.log = logging.LoggerAdapter(log, {"client_id": str(client_id), "actor": "PeerActor"})
        registry.register(self)

    def _cannot_resolve(
        self, resource_id: uuid.UUID, domain: str, proxy_ips: tuple[IPAddress, ...], reply: bool
    ) -> None:
        self.log.warning("no resolver attached; %s for resource %s not looked up",
                         domain, resource_id)

    # --------------------------------------------------------------- data path (any thread)

    def from_network(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """WireGuard datagrams from this client (UDP reader, or the actor for handshakes)."""
        with self.lock:
            if self._closed:
                self.counters["closed"] += len(datagrams)
                return
            try:
                now = self._clock.monotonic()
                self._from_network(datagrams, now)
                self._arm_earlier()
            except Exception:
                self._crashed_locked("network data")

    def from_tun(self, packets: list[bytes]) -> None:
        """IP packets the TUN reader read for this client's tunnel addresses."""
        with self.lock:
            if self._closed:
                self.counters["closed"] += len(packets)
                return
            try:
                self._from_tun(packets, self._clock.monotonic())
                self._arm_earlier()
            except Exception:
                self._crashed_locked("TUN packets")

    def on_timer(self) -> None:
        """Called by the Timer thread at the armed deadline."""
        with self.lock:
            if not self._closed:
                try:
                    self.handle_timeout_locked(self._clock.monotonic())
                    self.arm_locked()
                except Exception:
                    self._crashed_locked("timer")

    def _crashed_locked(self, what: str) -> None:
        """An exception escaped this client's data path on a shared IO or Timer thread: a
        bug, or input nothing checked. This client ends; the thread and every other client
        carry on (README, "Supervision")."""
        self.log.exception("handling %s failed; closing this client's session", what)
        self.fail_locked(f"its data path failed ({what})")

    def fail_locked(self, reason: str) -> None:
        """Close the session and have the node forget the client's connection; the client
        comes back with a new ``authorize_flow``. Once: a closed session reports nothing."""
        if self._closed:
            return
        self.close_locked()
        self._notify_node(PeerFailed(self.client_id, reason, self.owner))

    # --------------------------------------------------------------- control (lock held)

    def new_session_locked(
        self,
        *,
        local_index: int,
        peer_public: bytes,
        preshared_key: bytes,
        static: StaticKeyPair,
        rate_limiter: HandshakeRateLimiter,
        now: float,
    ) -> None:
        self._retire_tunnel()
        self._tunnel = Tunnel(
            static=static,
            peer_public=peer_public,
            preshared_key=preshared_key,
            local_index=local_index,
            rate_limiter=rate_limiter,
            rng=self._rng,
            now=now,
            persistent_keepalive=PERSISTENT_KEEPALIVE,
        )
        self._path = None
        self._pending.clear()
        self.log.info("new WireGuard session (index %#x)", local_index)

    def authorize_locked(
        self,
        resource: Resource,
        expires_at: float | None,
        ipv4: str,
        ipv6: str,
        now: float,
    ) -> None:
        if self._client is None:
            self._client = ClientOnGateway(
                client_id=self.client_id,
                ipv4=ipaddress.IPv4Address(ipv4),
                ipv6=ipaddress.IPv6Address(ipv6),
                now=now,
                icmp_prohibited=self._icmp_prohibited,
                nat_ports=self.nat_ports,
            )
        # Every authorization's addresses reach this client from the TUN (dataplane.md §4),
        # though its own packets must keep coming from the first ones (anti-spoofing).
        self._tun.tell(RegisterClient(self.client_id, ipv4, ipv6, self.from_tun))
        self._client.add_resource(resource, expires_at, now)
        self.log.info("access to resource %s granted", resource.id)

    def remove_resource_locked(self, resource_id: uuid.UUID) -> None:
        if self._client is None:
            return
        self._client.remove_resource(resource_id)
        self.log.info("access to resource %s removed", resource_id)
        self._drop_client_if_empty()

    def update_resource_locked(self, resource: Resource) -> None:
        if self._client is not None:
            self._client.update_resource(resource)

    def set_path_locked(self, path: Path) -> None:
        self._idle.start(self._clock.monotonic())  # idle counts from the nomination
        self._path = path
        while self._pending:
            self._send(self._pending.popleft())

    def resolved_locked(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: tuple[IPAddress, ...],
        addresses: tuple[IPAddress, ...],
        reply: bool,
        now: float,
    ) -> None:
        if self._client is None:
            return
        packet = self._client.handle_resolved(
            resource_id, domain, proxy_ips, addresses, now, reply=reply
        )
        if packet is not None and self._tunnel is not None:
            self._encapsulate_and_send(packet, now, self._clock.unix())

    def forget_client_locked(self) -> None:
        """Drop every authorization and translation; the WireGuard session stays."""
        if self._client is not None:
            self.log.info("client state dropped")
            self._tun.tell(UnregisterClient(self.client_id))
            self._retire_client()

    def close_locked(self) -> None:
        """The owner stops: no more data, no more timers, the TUN forgets the client."""
        self._closed = True
        self._wake.arm(None)
        if self._client is not None:
            with contextlib.suppress(pykka.ActorDeadError):  # the TUN is gone: so is its table
                self._tun.tell(UnregisterClient(self.client_id))
            self._retire_client()
        self._retire_tunnel()
        self._registry.retire(self, self.figures())

    # --------------------------------------------------------------- data path internals

    def _from_network(self, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        tunnel = self._tunnel
        if tunnel is None:
            self.counters["no_session"] += len(datagrams)
            return
        unix_now = self._clock.unix()
        client = self._client
        packets: list[bytes] = []
        for result in tunnel.decapsulate_many(datagrams, now, unix_now, packets):
            if isinstance(result, WriteToNetwork):
                self._send(result.datagram)
                while (extra := tunnel.poll_transmit()) is not None:
                    self._send(extra)
            elif isinstance(result, Dropped):
                self.counters[result.reason] += 1
        if packets:
            self._note_data(now)  # decrypted IP packets are data, filtered or not (§8.1)
            if client is None:
                self.counters["no_client_state"] += len(packets)
            else:
                self._to_tun(client, packets, now, unix_now)
        self._drain_tunnel_events()

    def _to_tun(
        self, client: ClientOnGateway, packets: list[bytes], now: float, unix_now: float
    ) -> None:
        """Filter the client's decrypted packets and write the allowed ones to the TUN."""
        to_tun: list[bytes] = []
        inbound = client.handle_inbound
        for packet in packets:
            out = inbound(packet, now)
            if type(out) is bytes:
                to_tun.append(out)
            elif isinstance(out, Reply):
                self._encapsulate_and_send(out.packet, now, unix_now)
            elif isinstance(out, NeedsResolution):
                self.resolve(out.resource_id, out.domain, tuple(out.proxy_ips), True)
            # Drop: counted by the core
        if to_tun:
            self._tun_writer.write_batch(to_tun)

    def _from_tun(self, packets: list[bytes], now: float) -> None:
        tunnel, client = self._tunnel, self._client
        if tunnel is None or client is None:
            self.counters["tun_no_session"] += len(packets)
            return
        unix_now = self._clock.unix()
        encapsulate = tunnel.encapsulate
        outbound = client.handle_outbound
        datagrams: list[bytes] = []
        for packet in packets:
            out = outbound(packet, now)
            if out is not None:
                result = encapsulate(out, now, unix_now)
                if isinstance(result, WriteToNetwork):
                    datagrams.append(result.datagram)
        if datagrams:
            self._send_many(datagrams)
            self._note_data(now)  # only encapsulated IP packets are data (§8.1)
        self._drain_tunnel_events()

    def _encapsulate_and_send(self, packet: bytes, now: float, unix_now: float) -> None:
        assert self._tunnel is not None
        result = self._tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send(result.datagram)

    def _send(self, datagram: bytes) -> None:
        path = self._path
        if path is None:
            if len(self._pending) == PENDING_DATAGRAMS:
                self.counters["pending_full"] += 1  # the oldest goes (snownet.md §8.1)
            self._pending.append(datagram)
        elif isinstance(path, DirectPath):
            self._sockets.send(path.remote, datagram, path.local)
        elif isinstance(path, RelayedPath):
            self._sockets.send(path.server, encode_channel_data(path.channel, datagram))

    def _send_many(self, datagrams: list[bytes]) -> None:
        path = self._path
        if isinstance(path, DirectPath):
            self._sockets.send_many(path.remote, datagrams, path.local)
        elif isinstance(path, RelayedPath):
            channel = path.channel
            self._sockets.send_many(
                path.server, [encode_channel_data(channel, d) for d in datagrams]
            )
        else:
            for datagram in datagrams:
                self._send(datagram)

    # --------------------------------------------------------------- timers & events

    def _note_data(self, now: float) -> None:
        """Once per batch: data keeps (or makes) the connection active."""
        if self._idle.note_data(now):
            self._notify_node(PeerIdle(self.client_id, False))

    def handle_timeout_locked(self, now: float) -> None:
        if self._idle.handle_timeout(now):
            self._notify_node(PeerIdle(self.client_id, True))
        unix_now = self._clock.unix()
        if self._tunnel is not None:
            self._tunnel.handle_timeout(now, unix_now)
            while (datagram := self._tunnel.poll_transmit()) is not None:
                self._send(datagram)
            self._drain_tunnel_events()
        if self._client is not None:
            self._client.handle_timeout(now, unix_now)
            while (event := self._client.poll_event()) is not None:
                if isinstance(event, ResourceExpired):
                    self.log.info("access to resource %s expired", event.resource_id)
                elif isinstance(event, NeedsResolution):
                    self.resolve(event.resource_id, event.domain, tuple(event.proxy_ips), False)
            self._drop_client_if_empty()

    def _drop_client_if_empty(self) -> None:
        if self._client is not None and self._client.is_empty():
            self.log.info("no resources left; client state dropped")
            self._tun.tell(UnregisterClient(self.client_id))
            self._retire_client()

    def _drain_tunnel_events(self) -> None:
        if self._tunnel is None:
            return
        while (event := self._tunnel.poll_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshakes += 1
                self.log.info("WireGuard handshake completed")
            elif isinstance(event, ConnectionExpired):
                self.log.info("WireGuard session expired")
                self._notify_node(
                    PeerFailed(self.client_id, "WireGuard connection expired", self.owner)
                )
                self._retire_tunnel()
                return

    def _next_deadline(self) -> float | None:
        deadline = self._idle.poll_timeout()
        if self._tunnel is not None:
            tunnel_deadline = self._tunnel.poll_timeout()
            if tunnel_deadline is not None and (deadline is None or tunnel_deadline < deadline):
                deadline = tunnel_deadline
        if self._client is not None:
            client_deadline = self._client.poll_timeout()
            if client_deadline is not None and (deadline is None or client_deadline < deadline):
                deadline = client_deadline
        return deadline

    def arm_locked(self) -> None:
        """Wake exactly at the cores' next deadline (after control messages and timeouts)."""
        if not self._closed:
            self._wake.arm(self._next_deadline())

    def _arm_earlier(self) -> None:
        """After a data batch: only make sure no new, earlier deadline is missed."""
        self._wake.arm_earlier(self._next_deadline())

    # --------------------------------------------------------------- figures

    def _retire_tunnel(self) -> None:
        """Keep a replaced or expired tunnel's byte counts (lock held)."""
        tunnel = self._tunnel
        if tunnel is None:
            return
        self._figures_gen += 1
        self._retired_rx += tunnel.rx_bytes
        self._retired_tx += tunnel.tx_bytes
        self._tunnel = None
        self._figures_gen += 1

    def _retire_client(self) -> None:
        """Keep a dropped client state's drop counters (lock held)."""
        client = self._client
        if client is None:
            return
        self._figures_gen += 1
        self.counters.update(client.counters)
        self._client = None
        self._figures_gen += 1

    def figures(self) -> Figures:
        """This session's totals, read WITHOUT the lock (a ``/metrics`` scrape must not
        queue behind the data path). Safe under the GIL: attributes are replaced whole,
        ``dict(counter)`` copies in one step, and the generation count (odd while the
        owner moves a tunnel's or a client's figures into the session's own) makes the
        reader retry rather than count them twice or not at all."""
        while True:
            generation = self._figures_gen
            if generation & 1:
                time.sleep(0)  # the owner is between the two steps: let it finish
                continue
            tunnel, client, path = self._tunnel, self._client, self._path
            rx, tx = self._retired_rx, self._retired_tx
            drops = Counter(dict(self.counters))
            if tunnel is not None:
                rx += tunnel.rx_bytes
                tx += tunnel.tx_bytes
            if client is not None:
                drops.update(dict(client.counters))
            if generation == self._figures_gen:
                break
        kind = "connecting" if path is None else path.describe().split(":")[0]
        return Figures(Counter({kind: 1}), rx, tx, self.handshakes, drops)

    # --------------------------------------------------------------- status

    def status_locked(self) -> dict[str, Any]:
        tunnel = self._tunnel
        resources = []
        if self._client is not None:
            for resource, expires_at in self._client.resources():
                resources.append(
                    {"id": str(resource.id), "name": getattr(resource, "name", "internet"),
                     "expires_at": expires_at}
                )
        path = self._path
        return {
            "client_id": str(self.client_id),
            "path": path.describe() if path is not None else "connecting",
            "idle": self._idle.idle,
            "remote": f"{path.remote[0]}:{path.remote[1]}" if path is not None else None,
            "last_handshake": tunnel.last_handshake_unix if tunnel is not None else None,
            "handshakes": self.handshakes,
            "rx_bytes": tunnel.rx_bytes if tunnel is not None else 0,
            "tx_bytes": tunnel.tx_bytes if tunnel is not None else 0,
            "resources": resources,
            "drops": dict(self.counters + (self._client.counters if self._client else Counter())),
            # Handshakes dropped because the node was under load (no cookie replies, as 1.4).
            "handshakes_under_load": tunnel.counters["under_load"] if tunnel is not None else 0,
        }
