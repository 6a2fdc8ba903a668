"""One client's data path, sans-IO: WireGuard tunnel, filters and DNS NAT, idle, path.

:class:`ClientSession` combines the cores one client needs (the WireGuard
:class:`~gateway.wg.tunnel.Tunnel`, :class:`~gateway.peer.ClientOnGateway` with its
filters, DNS NAT and expiry, and :class:`~gateway.idle.IdleTracker`) and makes every
decision that joins them: what counts as data for idle tracking, what an expired WireGuard
session means, when the client's state goes because it is empty, how the nominated path
turns a datagram into a send (direct from the path's base, or wrapped in ChannelData to the
relay), which datagrams wait for a path, and which deadline comes next. Firezone keeps the
same combination in ``rust/connlib/tunnel/src/gateway.rs`` (``GatewayState``) over
``rust/connlib/snownet/src/node.rs``.

The shell (``actors/peer_session.py``) feeds it, under one lock:

* data: :meth:`ClientSession.from_network_batch` (WireGuard datagrams from the client; the
  IP packets for the TUN come back as a list) and :meth:`ClientSession.from_tun_batch` (IP
  packets for the client);
* control: :meth:`~ClientSession.new_wireguard_session`, :meth:`~ClientSession.authorize`,
  :meth:`~ClientSession.remove_resource`, :meth:`~ClientSession.update_resource`,
  :meth:`~ClientSession.set_path`, :meth:`~ClientSession.resolved`,
  :meth:`~ClientSession.forget_client`, :meth:`~ClientSession.close`;
* time: :meth:`~ClientSession.handle_timeout` at :meth:`~ClientSession.poll_timeout`.

and carries out what it hands out: :attr:`~ClientSession.transmits` (datagrams with their
destination decided, taken with :meth:`~ClientSession.take_transmits`) and
:attr:`~ClientSession.events` (:class:`IdleChanged`, :class:`SessionFailed`,
:class:`ResolveRequest`, :class:`TunRegister`, :class:`TunUnregister`, taken with
:meth:`~ClientSession.take_events`, or one at a time with ``poll_transmit`` and
``poll_event``). Outputs are per batch, never per packet: the data
path allocates nothing per packet beyond what the tunnel and the filters do.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from gateway.drops import Drop
from gateway.idle import IdleTracker
from gateway.node import DirectPath, Path
from gateway.packet.ip import IPAddress
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

__all__ = [
    "PENDING_DATAGRAMS",
    "PERSISTENT_KEEPALIVE",
    "ClientSession",
    "Figures",
    "IdleChanged",
    "ResolveRequest",
    "SessionEvent",
    "SessionFailed",
    "Transmit",
    "TunRegister",
    "TunUnregister",
]

log = logging.getLogger(__name__)

#: WireGuard datagrams produced before ICE nominated a path: the oldest goes first when
#: more come (upstream buffers them too, ``rust/connlib/snownet/src/node.rs``).
PENDING_DATAGRAMS = 10
#: The client's configured persistent keepalive (``rust/connlib/snownet/src/node.rs``).
PERSISTENT_KEEPALIVE = 25.0
#: Why a session fails when its WireGuard session expired (the node forgets the
#: connection, as ``rust/connlib/snownet/src/node.rs`` does).
EXPIRED_REASON = "WireGuard connection expired"


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``payloads``, in order, to ``dst`` from local address ``src`` (None: the
    kernel's choice). Framing is done: relayed datagrams are ChannelData already. The shell
    may send a run of equal-size payloads as one GSO send."""

    dst: Address
    payloads: list[bytes]
    src: Address | None = None


@dataclass(frozen=True, slots=True)
class IdleChanged:
    """The connection went idle (10 s without data) or active again; only on a change."""

    idle: bool


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The node should forget this client's connection (the session itself stays open)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResolveRequest:
    """Look ``domain`` up and feed the answer to :meth:`ClientSession.resolved`; ``reply``:
    the client's DNS query waits for it (answer with a packet), else a background refresh."""

    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class TunRegister:
    """Packets the TUN reads for these addresses belong to this client."""

    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class TunUnregister:
    """The TUN forgets this client's addresses (its state was dropped)."""


SessionEvent = IdleChanged | SessionFailed | ResolveRequest | TunRegister | TunUnregister


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


# ----------------------------------------------------------------------------- the core


class ClientSession:
    """One client's WireGuard session, authorizations, filters, idle state and path."""

    def __init__(
        self,
        client_id: uuid.UUID,
        *,
        rng: Rng,
        icmp_prohibited: bool = False,
        nat_ports: tuple[int, int] = NAT_PORTS,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.client_id = client_id
        self._rng = rng
        self._icmp_prohibited = icmp_prohibited
        self._nat_ports = nat_ports
        self.log: logging.Logger | logging.LoggerAdapter[Any] = (
            logger if logger is not None
            else logging.LoggerAdapter(log, {"client_id": str(client_id)})
        )
        self.tunnel: Tunnel | None = None
        self.client: ClientOnGateway | None = None
        self.path: Path | None = None
        self.pending: deque[bytes] = deque(maxlen=PENDING_DATAGRAMS)
        self.idle = IdleTracker()
        self.closed = False
        #: Datagrams to send, in order (the shell takes them after each call).
        self.transmits: list[Transmit] = []
        #: Reports and requests for the shell, in order.
        self.events: list[SessionEvent] = []
        #: Drops by reason (the client state's own are added when it goes).
        self.counters: Counter[str] = Counter()
        self.handshakes = 0
        #: bytes of WireGuard sessions replaced or expired (the Tunnel's own count is lost)
        self._retired_rx = 0
        self._retired_tx = 0
        #: odd while figures move between the tunnel/client and the session (see figures)
        self._figures_gen = 0

    # --------------------------------------------------------------- outputs

    def take_transmits(self) -> list[Transmit]:
        transmits, self.transmits = self.transmits, []
        return transmits

    def take_events(self) -> list[SessionEvent]:
        events, self.events = self.events, []
        return events

    def poll_transmit(self) -> Transmit | None:
        """One at a time, like the other cores (the shell takes them all at once)."""
        return self.transmits.pop(0) if self.transmits else None

    def poll_event(self) -> SessionEvent | None:
        return self.events.pop(0) if self.events else None

    def poll_timeout(self) -> float | None:
        """The earliest of the idle tracker's, the tunnel's and the client state's deadlines;
        None once closed."""
        if self.closed:
            return None
        deadline = self.idle.poll_timeout()
        tunnel, client = self.tunnel, self.client
        if tunnel is not None:
            tunnel_deadline = tunnel.poll_timeout()
            if tunnel_deadline is not None and (deadline is None or tunnel_deadline < deadline):
                deadline = tunnel_deadline
        if client is not None:
            client_deadline = client.poll_timeout()
            if client_deadline is not None and (deadline is None or client_deadline < deadline):
                deadline = client_deadline
        return deadline

    # --------------------------------------------------------------- data path

    def from_network_batch(
        self, datagrams: list[tuple[bytes, Address]], now: float, unix_now: float
    ) -> list[bytes]:
        """WireGuard datagrams from this client; returns the IP packets for the TUN."""
        tunnel = self.tunnel
        if tunnel is None:
            self.counters[Drop.CLOSED if self.closed else Drop.NO_SESSION] += len(datagrams)
            return []
        client = self.client
        packets: list[bytes] = []
        for result in tunnel.decapsulate_many(datagrams, now, unix_now, packets):
            if isinstance(result, WriteToNetwork):
                self._send(result.datagram)
                while (extra := tunnel.poll_transmit()) is not None:
                    self._send(extra)
            elif isinstance(result, Dropped):
                self.counters[result.reason] += 1
        # The initiator's first message on a new session (a keepalive: no result) confirms
        # it and flushes the packets queued for it into the tunnel's outbox: send them
        # now, not at this session's next timer (up to the idle timer, 10 s, later).
        while (extra := tunnel.poll_transmit()) is not None:
            self._send(extra)
        to_tun: list[bytes] = []
        if packets:
            # Decrypted IP packets are data, filtered or not (gateway/idle.py); once a batch.
            if self.idle.note_data(now):
                self.events.append(IdleChanged(False))
            if client is None:
                self.counters[Drop.NO_CLIENT_STATE] += len(packets)
            else:
                inbound = client.handle_inbound
                for packet in packets:
                    out = inbound(packet, now)
                    if type(out) is bytes:
                        to_tun.append(out)
                    elif isinstance(out, Reply):
                        self._encapsulate_and_send(out.packet, now, unix_now)
                    elif isinstance(out, NeedsResolution):
                        self.events.append(ResolveRequest(
                            out.resource_id, out.domain, tuple(out.proxy_ips), True))
                    # Drop: counted by the client state
        self._drain_tunnel_events()
        return to_tun

    def from_tun_batch(self, packets: list[bytes], now: float, unix_now: float) -> None:
        """IP packets the TUN read for this client: filtered, encrypted, queued to send."""
        tunnel, client = self.tunnel, self.client
        if tunnel is None or client is None:
            self.counters[Drop.CLOSED if self.closed else Drop.TUN_NO_SESSION] += len(packets)
            return
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
            path = self.path
            if path is None:
                for datagram in datagrams:
                    self._send(datagram)
            elif isinstance(path, DirectPath):
                self.transmits.append(Transmit(path.remote, datagrams, path.local))
            else:
                channel = path.channel
                self.transmits.append(
                    Transmit(path.server, [encode_channel_data(channel, d) for d in datagrams])
                )
            # Only encapsulated IP packets are data (gateway/idle.py); once a batch.
            if self.idle.note_data(now):
                self.events.append(IdleChanged(False))
        self._drain_tunnel_events()

    def handle_timeout(self, now: float, unix_now: float) -> None:
        if self.closed:
            return
        if self.idle.handle_timeout(now):
            self.events.append(IdleChanged(True))
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.handle_timeout(now, unix_now)
            while (datagram := tunnel.poll_transmit()) is not None:
                self._send(datagram)
            self._drain_tunnel_events()
        client = self.client
        if client is not None:
            client.handle_timeout(now, unix_now)
            while (event := client.poll_event()) is not None:
                if isinstance(event, ResourceExpired):
                    self.log.info("access to resource %s expired", event.resource_id)
                elif isinstance(event, NeedsResolution):
                    self.events.append(ResolveRequest(
                        event.resource_id, event.domain, tuple(event.proxy_ips), False))
            self._drop_client_if_empty()

    # --------------------------------------------------------------- control

    def new_wireguard_session(
        self,
        *,
        local_index: int,
        peer_public: bytes,
        preshared_key: bytes,
        static: StaticKeyPair,
        rate_limiter: HandshakeRateLimiter,
        now: float,
    ) -> None:
        """Start or replace the WireGuard session; the path is ICE's to nominate again."""
        self._retire_tunnel()
        self.tunnel = Tunnel(
            static=static,
            peer_public=peer_public,
            preshared_key=preshared_key,
            local_index=local_index,
            rate_limiter=rate_limiter,
            rng=self._rng,
            now=now,
            persistent_keepalive=PERSISTENT_KEEPALIVE,
        )
        self.path = None
        self.pending.clear()
        self.log.info("new WireGuard session (index %#x)", local_index)

    def authorize(
        self, resource: Resource, expires_at: float | None, ipv4: str, ipv6: str, now: float
    ) -> None:
        if self.client is None:
            self.client = ClientOnGateway(
                client_id=self.client_id,
                ipv4=ipaddress.IPv4Address(ipv4),
                ipv6=ipaddress.IPv6Address(ipv6),
                now=now,
                icmp_prohibited=self._icmp_prohibited,
                nat_ports=self._nat_ports,
            )
        # Every authorization's addresses reach this client from the TUN, though its own
        # packets must keep coming from the first ones (anti-spoofing); upstream:
        # ``rust/connlib/tunnel/src/gateway.rs``.
        self.events.append(TunRegister(ipv4, ipv6))
        self.client.add_resource(resource, expires_at, now)
        self.log.info("access to resource %s granted", resource.id)

    def remove_resource(self, resource_id: uuid.UUID) -> None:
        if self.client is None:
            return
        self.client.remove_resource(resource_id)
        self.log.info("access to resource %s removed", resource_id)
        self._drop_client_if_empty()

    def update_resource(self, resource: Resource) -> None:
        if self.client is not None:
            self.client.update_resource(resource)

    def set_path(self, path: Path, now: float) -> None:
        """ICE nominated ``path``: idle counts from now, the pending datagrams go out."""
        self.idle.start(now)
        self.path = path
        pending = self.pending
        while pending:
            self._send(pending.popleft())

    def resolved(
        self,
        resource_id: uuid.UUID,
        domain: str,
        proxy_ips: tuple[IPAddress, ...],
        addresses: tuple[IPAddress, ...],
        reply: bool,
        now: float,
        unix_now: float,
    ) -> None:
        """A lookup's answer (or a legacy DNS set-up): set up the translation, and answer
        the client's query if it waits."""
        if self.client is None:
            return
        packet = self.client.handle_resolved(
            resource_id, domain, proxy_ips, addresses, now, reply=reply
        )
        if packet is not None and self.tunnel is not None:
            self._encapsulate_and_send(packet, now, unix_now)

    def forget_client(self) -> None:
        """Drop every authorization and translation; the WireGuard session stays."""
        if self.client is not None:
            self.log.info("client state dropped")
            self.events.append(TunUnregister())
            self._retire_client()

    def close(self) -> None:
        """No more data or timers; the TUN forgets the client. Idempotent."""
        self.closed = True
        if self.client is not None:
            self.events.append(TunUnregister())
            self._retire_client()
        self._retire_tunnel()
        self.transmits.clear()
        self.pending.clear()

    # --------------------------------------------------------------- internals

    def _encapsulate_and_send(self, packet: bytes, now: float, unix_now: float) -> None:
        assert self.tunnel is not None
        result = self.tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send(result.datagram)

    def _send(self, datagram: bytes) -> None:
        """One datagram: to the path, or into the pending buffer until there is one."""
        path = self.path
        if path is None:
            if len(self.pending) == PENDING_DATAGRAMS:
                self.counters[Drop.PENDING_FULL] += 1  # the oldest goes
            self.pending.append(datagram)
        elif isinstance(path, DirectPath):
            self.transmits.append(Transmit(path.remote, [datagram], path.local))
        else:
            self.transmits.append(
                Transmit(path.server, [encode_channel_data(path.channel, datagram)])
            )

    def _drop_client_if_empty(self) -> None:
        if self.client is not None and self.client.is_empty():
            self.log.info("no resources left; client state dropped")
            self.events.append(TunUnregister())
            self._retire_client()

    def _drain_tunnel_events(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        while (event := tunnel.poll_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshakes += 1
                self.log.info("WireGuard handshake completed")
            elif isinstance(event, ConnectionExpired):
                self.log.info("WireGuard session expired")
                self.events.append(SessionFailed(EXPIRED_REASON))
                self._retire_tunnel()
                return

    # --------------------------------------------------------------- figures

    def _retire_tunnel(self) -> None:
        """Keep a replaced or expired tunnel's byte counts."""
        tunnel = self.tunnel
        if tunnel is None:
            return
        self._figures_gen += 1
        self._retired_rx += tunnel.rx_bytes
        self._retired_tx += tunnel.tx_bytes
        self.tunnel = None
        self._figures_gen += 1

    def _retire_client(self) -> None:
        """Keep a dropped client state's drop counters."""
        client = self.client
        if client is None:
            return
        self._figures_gen += 1
        self.counters.update(client.counters)
        self.client = None
        self._figures_gen += 1

    def read_figures(self) -> Figures | None:
        """This session's totals, safe to call from another thread WITHOUT the shell's lock
        (a ``/metrics`` scrape must not queue behind the data path), under the GIL:
        attributes are replaced whole and ``dict(counter)`` copies in one step. None when
        the owner was moving a tunnel's or a client's figures into the session's own
        meanwhile (the generation count is odd, or moved): the reader yields and retries,
        rather than count them twice or not at all."""
        generation = self._figures_gen
        if generation & 1:
            return None
        tunnel, client, path = self.tunnel, self.client, self.path
        rx, tx = self._retired_rx, self._retired_tx
        drops = Counter(dict(self.counters))
        if tunnel is not None:
            rx += tunnel.rx_bytes
            tx += tunnel.tx_bytes
        if client is not None:
            drops.update(dict(client.counters))
        if generation != self._figures_gen:
            return None
        kind = "connecting" if path is None else path.describe().split(":")[0]
        return Figures(Counter({kind: 1}), rx, tx, self.handshakes, drops)

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        tunnel, client, path = self.tunnel, self.client, self.path
        resources = []
        if client is not None:
            for resource, expires_at in client.resources():
                resources.append(
                    {"id": str(resource.id), "name": getattr(resource, "name", "internet"),
                     "expires_at": expires_at}
                )
        return {
            "client_id": str(self.client_id),
            "path": path.describe() if path is not None else "connecting",
            "idle": self.idle.idle,
            "remote": f"{path.remote[0]}:{path.remote[1]}" if path is not None else None,
            "last_handshake": tunnel.last_handshake_unix if tunnel is not None else None,
            "handshakes": self.handshakes,
            "rx_bytes": tunnel.rx_bytes if tunnel is not None else 0,
            "tx_bytes": tunnel.tx_bytes if tunnel is not None else 0,
            "resources": resources,
            "drops": dict(self.counters + (client.counters if client else Counter())),
            # Handshakes dropped because the node was under load (no cookie replies, as 1.4).
            "handshakes_under_load": tunnel.counters[Drop.UNDER_LOAD] if tunnel is not None else 0,
        }
