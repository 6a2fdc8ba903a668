"""PeerActor: one client's WireGuard session and per-client state (authorizations, filters, NAT).

It is a thin shell over two cores, :class:`gateway.wg.tunnel.Tunnel` and
:class:`gateway.peer.ClientOnGateway`. Data arrives in batches (``FromNetwork`` from the
UDP reader or the NodeActor, ``FromTun`` from the TUN reader) and leaves in batches: one
locked ``TunWriter.write_batch`` per network batch, direct ``sendto`` for the network side.
A packet therefore crosses exactly one actor mailbox on its way through the gateway.

Lifecycle: started by the NodeActor when a client's first connection is created; a new
connection for the same client (``authorize_flow`` with new ICE credentials) only swaps the
WireGuard session (per-client state survives, dataplane.md §4); stopped when the connection
fails or on reset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import pykka

from actors.backpressure import InFlight
from actors.clock import Clock
from actors.io.udp import FromNetwork, UdpSockets
from actors.resolver import IPAddress, Resolver
from actors.timer import ActorTimer, Timer, Wake
from actors.tun import FromTun, RegisterClient, TunWriter, UnregisterClient
from gateway.idle import IdleTracker
from gateway.node import DirectPath, Path, RelayedPath
from gateway.peer import ClientOnGateway, Drop, NeedsResolution, Reply, ResourceExpired
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
    WriteToTunnel,
)

log = logging.getLogger(__name__)

#: WireGuard datagrams produced before ICE nominated a path (snownet.md §8.1).
PENDING_DATAGRAMS = 10
#: The client's configured persistent keepalive (snownet.md §5.1).
PERSISTENT_KEEPALIVE = 25.0


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class NewSession:
    """Start (or replace) the WireGuard session with these parameters."""

    local_index: int
    peer_public: bytes
    preshared_key: bytes
    static: StaticKeyPair
    rate_limiter: HandshakeRateLimiter

    def __repr__(self) -> str:
        return f"NewSession(index={self.local_index:#x})"


@dataclass(frozen=True, slots=True)
class Authorize:
    resource: Resource
    expires_at: float | None
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class SetupDnsResource:
    """Legacy DNS set-up (``request_connection``/``allow_access`` with a ResolveRequest)."""

    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class RemoveResource:
    resource_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class UpdateResource:
    resource: Resource


@dataclass(frozen=True, slots=True)
class SetPath:
    path: Path


@dataclass(frozen=True, slots=True)
class Resolved:
    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]
    addresses: tuple[IPAddress, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class GetPeerStatus:
    pass


@dataclass(frozen=True, slots=True)
class PeerIdle:
    """Told to the NodeActor on Connected <-> Idle transitions (only then, never per packet)."""

    client_id: uuid.UUID
    idle: bool


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """Told to the NodeActor when the WireGuard session expired (snownet.md §8.4 cause 3)."""

    client_id: uuid.UUID
    reason: str


# ----------------------------------------------------------------------------- actor


class PeerActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        client_id: uuid.UUID,
        node: pykka.ActorRef[Any],
        tun: pykka.ActorRef[Any],
        tun_writer: TunWriter,
        sockets: UdpSockets,
        clock: Clock,
        rng: Rng,
        timer: Timer,
        resolver: Resolver,
        net_inflight: InFlight,
        icmp_prohibited: bool = False,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self._node = node
        self._tun = tun
        self._tun_writer = tun_writer
        self._sockets = sockets
        self._clock = clock
        self._rng = rng
        self._timer = timer
        self._resolver = resolver
        self.net_inflight = net_inflight
        self.tun_inflight = InFlight(8)
        self._icmp_prohibited = icmp_prohibited
        self._tunnel: Tunnel | None = None
        self._client: ClientOnGateway | None = None
        self._path: Path | None = None
        self._pending: deque[bytes] = deque(maxlen=PENDING_DATAGRAMS)
        self._wake: ActorTimer | None = None
        self.counters: Counter[str] = Counter()  # drops by reason
        self.handshakes = 0
        self._idle = IdleTracker()
        self._log = logging.LoggerAdapter(log, {"client_id": str(client_id), "actor": "PeerActor"})

    # --------------------------------------------------------------- lifecycle

    def on_start(self) -> None:
        self._wake = ActorTimer(self._timer, self.actor_ref)

    def on_stop(self) -> None:
        self._cleanup()

    def on_failure(self, *args: object) -> None:
        self._log.error("PeerActor for %s crashed", self.client_id)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._wake is not None:
            self._wake.arm(None)
        if self._client is not None:
            self._tun.tell(UnregisterClient(self.client_id))
            self._client = None

    # --------------------------------------------------------------- dispatch

    def on_receive(self, message: Any) -> Any:
        now = self._clock.monotonic()
        if isinstance(message, FromNetwork):
            try:
                self._from_network(message.datagrams, now)
            finally:
                self.net_inflight.release()
        elif isinstance(message, FromTun):
            try:
                self._from_tun(message.packets, now)
            finally:
                self.tun_inflight.release()
        elif isinstance(message, Wake):
            self._handle_timeout(now)
        elif isinstance(message, NewSession):
            self._new_session(message, now)
        elif isinstance(message, Authorize):
            self._authorize(message, now)
        elif isinstance(message, RemoveResource):
            self._remove_resource(message.resource_id)
        elif isinstance(message, UpdateResource):
            if self._client is not None:
                self._client.update_resource(message.resource)
        elif isinstance(message, SetupDnsResource):
            self._resolve(message.resource_id, message.domain, message.proxy_ips, reply=False)
        elif isinstance(message, Resolved):
            self._resolved(message, now)
        elif isinstance(message, SetPath):
            self._set_path(message.path)
        elif isinstance(message, GetPeerStatus):
            return self.status()
        else:
            self._log.warning("unexpected message %r", type(message).__name__)
        self._arm()
        return None

    # --------------------------------------------------------------- control

    def _new_session(self, msg: NewSession, now: float) -> None:
        self._tunnel = Tunnel(
            static=msg.static,
            peer_public=msg.peer_public,
            preshared_key=msg.preshared_key,
            local_index=msg.local_index,
            rate_limiter=msg.rate_limiter,
            rng=self._rng,
            now=now,
            persistent_keepalive=PERSISTENT_KEEPALIVE,
        )
        self._path = None
        self._pending.clear()
        self._log.info("new WireGuard session (index %#x)", msg.local_index)

    def _authorize(self, msg: Authorize, now: float) -> None:
        if self._client is None:
            self._client = ClientOnGateway(
                client_id=self.client_id,
                ipv4=ipaddress.IPv4Address(msg.ipv4),
                ipv6=ipaddress.IPv6Address(msg.ipv6),
                now=now,
                icmp_prohibited=self._icmp_prohibited,
            )
            register = RegisterClient(
                self.client_id, msg.ipv4, msg.ipv6, self.actor_ref, self.tun_inflight
            )
            self._tun.tell(register)
        self._client.add_resource(msg.resource, msg.expires_at, now)
        self._log.info("access to resource %s granted", msg.resource.id)

    def _remove_resource(self, resource_id: uuid.UUID) -> None:
        if self._client is None:
            return
        self._client.remove_resource(resource_id)
        self._log.info("access to resource %s removed", resource_id)
        self._drop_client_if_empty()

    def _drop_client_if_empty(self) -> None:
        if self._client is not None and self._client.is_empty():
            self._log.info("no resources left; client state dropped")
            self._tun.tell(UnregisterClient(self.client_id))
            self._client = None

    def _set_path(self, path: Path) -> None:
        self._idle.start(self._clock.monotonic())  # idle counts from the nomination
        self._path = path
        while self._pending:
            self._send(self._pending.popleft())

    # --------------------------------------------------------------- data path

    def _from_network(self, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        tunnel = self._tunnel
        if tunnel is None:
            self.counters["no_session"] += len(datagrams)
            return
        unix_now = self._clock.unix()
        client = self._client
        to_tun: list[bytes] = []
        for datagram, src in datagrams:
            result = tunnel.decapsulate(datagram, src, now, unix_now)
            if isinstance(result, WriteToTunnel):
                if client is None:
                    self.counters["no_client_state"] += 1
                    continue
                out = client.handle_inbound(result.packet, now)
                if isinstance(out, bytes):
                    to_tun.append(out)
                elif isinstance(out, Reply):
                    self._encapsulate_and_send(out.packet, now, unix_now)
                elif isinstance(out, NeedsResolution):
                    self._resolve(out.resource_id, out.domain, out.proxy_ips, reply=True)
                elif isinstance(out, Drop):
                    pass  # counted by the core
            elif isinstance(result, WriteToNetwork):
                self._send(result.datagram)
                while (extra := tunnel.poll_transmit()) is not None:
                    self._send(extra)
            elif isinstance(result, Dropped):
                self.counters[result.reason] += 1
        if to_tun:
            self._tun_writer.write_batch(to_tun)
            self._note_data(now)
        self._drain_tunnel_events()

    def _from_tun(self, packets: list[bytes], now: float) -> None:
        tunnel, client = self._tunnel, self._client
        if tunnel is None or client is None:
            self.counters["tun_no_session"] += len(packets)
            return
        unix_now = self._clock.unix()
        for packet in packets:
            out = client.handle_outbound(packet, now)
            if out is not None:
                self._encapsulate_and_send(out, now, unix_now)
        self._note_data(now)
        self._drain_tunnel_events()

    def _encapsulate_and_send(self, packet: bytes, now: float, unix_now: float) -> None:
        assert self._tunnel is not None
        result = self._tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send(result.datagram)

    def _send(self, datagram: bytes) -> None:
        path = self._path
        if path is None:
            self._pending.append(datagram)
        elif isinstance(path, DirectPath):
            self._sockets.send(path.remote, datagram)
        elif isinstance(path, RelayedPath):
            self._sockets.send(path.server, encode_channel_data(path.channel, datagram))

    # --------------------------------------------------------------- timers & events

    def _note_data(self, now: float) -> None:
        """Once per batch: data keeps (or makes) the connection active."""
        if self._idle.note_data(now):
            self._node.tell(PeerIdle(self.client_id, False))

    def _handle_timeout(self, now: float) -> None:
        if self._idle.handle_timeout(now):
            self._node.tell(PeerIdle(self.client_id, True))
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
                    self._log.info("access to resource %s expired", event.resource_id)
                elif isinstance(event, NeedsResolution):
                    self._resolve(event.resource_id, event.domain, event.proxy_ips, reply=False)
            self._drop_client_if_empty()

    def _drain_tunnel_events(self) -> None:
        if self._tunnel is None:
            return
        while (event := self._tunnel.poll_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshakes += 1
                self._log.info("WireGuard handshake completed")
            elif isinstance(event, ConnectionExpired):
                self._log.info("WireGuard session expired")
                self._node.tell(PeerFailed(self.client_id, "WireGuard connection expired"))
                self._tunnel = None
                return

    def _arm(self) -> None:
        if self._wake is None:
            return
        deadlines = []
        if self._tunnel is not None:
            deadlines.append(self._tunnel.poll_timeout())
        if self._client is not None:
            deadlines.append(self._client.poll_timeout())
        deadlines.append(self._idle.poll_timeout())
        present = [d for d in deadlines if d is not None]
        self._wake.arm(min(present) if present else None)

    # --------------------------------------------------------------- DNS

    def _resolve(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: tuple[IPAddress, ...] | list[IPAddress],
        *,
        reply: bool,
    ) -> None:
        ref = self.actor_ref
        proxies = tuple(proxy_ips)

        def done(addresses: list[IPAddress]) -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(Resolved(resource_id, domain, proxies, tuple(addresses), reply))

        self._resolver.resolve(domain, done)

    def _resolved(self, msg: Resolved, now: float) -> None:
        if self._client is None:
            return
        packet = self._client.handle_resolved(
            msg.resource_id, msg.domain, msg.proxy_ips, msg.addresses, now, reply=msg.reply
        )
        if packet is not None and self._tunnel is not None:
            self._encapsulate_and_send(packet, now, self._clock.unix())

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        tunnel = self._tunnel
        resources = []
        if self._client is not None:
            for resource, expires_at in self._client.resources():
                resources.append(
                    {"id": str(resource.id), "name": getattr(resource, "name", "internet"),
                     "expires_at": expires_at}
                )
        return {
            "client_id": str(self.client_id),
            "actor": self.actor_urn,
            "path": self._path.describe() if self._path is not None else "connecting",
            "idle": self._idle.idle,
            "remote": (
                f"{self._path.remote[0]}:{self._path.remote[1]}" if self._path is not None else None
            ),
            "last_handshake": tunnel.last_handshake_unix if tunnel is not None else None,
            "handshakes": self.handshakes,
            "rx_bytes": tunnel.rx_bytes if tunnel is not None else 0,
            "tx_bytes": tunnel.tx_bytes if tunnel is not None else 0,
            "resources": resources,
            "drops": dict(self.counters + (self._client.counters if self._client else Counter())),
        }
