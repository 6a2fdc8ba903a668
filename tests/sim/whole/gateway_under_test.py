"""The ONE place the whole-gateway simulation touches the gateway's internals.

It is the stand-in until ``gateway/gateway.py`` (the gateway's pure state machine) and
``gateway/session.py`` (one client's pure data path) exist: today it composes the cores
the way ``actors/node.py`` (NodeActor) and ``actors/peer_session.py`` (PeerSession) do —
:class:`gateway.node.Node` for the key, relays, ICE and the connection table, and per
client a :class:`gateway.wg.tunnel.Tunnel`, a :class:`gateway.peer.ClientOnGateway`, an
:class:`gateway.idle.IdleTracker`, the nominated path and the pending datagrams — minus
threads, sockets, mailboxes and the legacy (``request_connection``/DNS) path. Once those
modules land, this file becomes a thin wrapper over them and nothing else in
``tests/sim/whole`` changes.

The interface the world uses (everything else is private):

* inputs: :meth:`portal_message` (event, payload as the portal pushes them),
  :meth:`datagram_in`, :meth:`tun_packet_in`, :meth:`advance`, :meth:`reset`;
* outputs: :meth:`portal_out` (event, payload), :meth:`datagrams_out` (src, dst, payload),
  :meth:`tun_out` (IP packets), :meth:`connect_requests` (the public key the portal
  connection must (re)connect with), :attr:`public_key`, :attr:`local_addresses`,
  :meth:`poll_timeout`.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections import deque
from typing import Any

from gateway.errors import GatewayError
from gateway.ice.candidate import IceCredentials
from gateway.idle import IdleTracker
from gateway.node import (
    CandidatesAdded,
    CandidatesInvalidated,
    ConnectionCreated,
    ConnectionFailed,
    DirectPath,
    Node,
    NoTurnServers,
    Path,
    PathChanged,
    RelayedPath,
    TurnServer,
)
from gateway.peer import ClientOnGateway, Reply
from gateway.portal.messages import (
    AuthorizeFlow,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    FlowAuthorized,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    PortalIceCredentials,
    RejectAccess,
    RelaysPresence,
    ResourceUpdated,
    encode_egress,
    merge_relays,
    parse_ingress,
)
from gateway.turn.channel_data import encode_channel_data
from gateway.types import Address, Rng
from gateway.wg.keys import encode_key
from gateway.wg.tunnel import ConnectionExpired, Dropped, Tunnel, WriteToNetwork

#: As actors/peer_session.py.
PENDING_DATAGRAMS = 10
PERSISTENT_KEEPALIVE = 25.0


class _Session:
    """What PeerSession combines for one client (actors/peer_session.py), single-threaded."""

    def __init__(self, owner: GatewayUnderTest, client_id: uuid.UUID) -> None:
        self.owner = owner
        self.client_id = client_id
        self.tunnel: Tunnel | None = None
        self.client: ClientOnGateway | None = None
        self.path: Path | None = None
        self.pending: deque[bytes] = deque(maxlen=PENDING_DATAGRAMS)
        self.idle = IdleTracker()

    # control
    def new_session(self, created: ConnectionCreated, now: float) -> None:
        node = self.owner.node
        self.tunnel = Tunnel(
            static=node.static, peer_public=created.peer_public,
            preshared_key=created.preshared_key, local_index=created.local_index,
            rate_limiter=node.rate_limiter, rng=self.owner.rng, now=now,
            persistent_keepalive=PERSISTENT_KEEPALIVE,
        )
        self.path = None
        self.pending.clear()

    def authorize(self, msg: AuthorizeFlow, now: float) -> None:
        client = msg.client
        if self.client is None:
            self.client = ClientOnGateway(
                client_id=self.client_id, ipv4=ipaddress.IPv4Address(str(client.ipv4)),
                ipv6=ipaddress.IPv6Address(str(client.ipv6)), now=now,
            )
        self.owner.register_tun(self.client_id, str(client.ipv4), str(client.ipv6))
        self.client.add_resource(msg.resource, msg.expires_at, now)

    def remove_resource(self, resource_id: uuid.UUID) -> None:
        if self.client is not None:
            self.client.remove_resource(resource_id)
            self._drop_client_if_empty()

    def set_path(self, path: Path, now: float) -> None:
        self.idle.start(now)
        self.path = path
        while self.pending:
            self._send(self.pending.popleft())

    # data
    def from_network(self, datagram: bytes, src: Address, now: float, unix: float) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        packets: list[bytes] = []
        for result in tunnel.decapsulate_many([(datagram, src)], now, unix, packets):
            if isinstance(result, WriteToNetwork):
                self._send(result.datagram)
                while (extra := tunnel.poll_transmit()) is not None:
                    self._send(extra)
            elif isinstance(result, Dropped):
                pass
        if packets:
            if self.idle.note_data(now):
                self.owner.node.set_idle(self.client_id, False, now)
            if self.client is not None:
                for packet in packets:
                    out = self.client.handle_inbound(packet, now)
                    if type(out) is bytes:
                        self.owner.tun.append(out)
                    elif isinstance(out, Reply):
                        self._encapsulate_and_send(out.packet, now, unix)
        self._drain_tunnel_events(now)

    def from_tun(self, packet: bytes, now: float, unix: float) -> None:
        if self.tunnel is None or self.client is None:
            return
        out = self.client.handle_outbound(packet, now)
        if out is not None:
            result = self.tunnel.encapsulate(out, now, unix)
            if isinstance(result, WriteToNetwork):
                self._send(result.datagram)
                if self.idle.note_data(now):
                    self.owner.node.set_idle(self.client_id, False, now)
        self._drain_tunnel_events(now)

    def _encapsulate_and_send(self, packet: bytes, now: float, unix: float) -> None:
        assert self.tunnel is not None
        result = self.tunnel.encapsulate(packet, now, unix)
        if isinstance(result, WriteToNetwork):
            self._send(result.datagram)

    def _send(self, datagram: bytes) -> None:
        path = self.path
        if path is None:
            self.pending.append(datagram)
        elif isinstance(path, DirectPath):
            self.owner.udp.append((path.local, path.remote, datagram))
        elif isinstance(path, RelayedPath):
            self.owner.udp.append((None, path.server, encode_channel_data(path.channel, datagram)))

    # timers
    def handle_timeout(self, now: float, unix: float) -> None:
        if self.idle.handle_timeout(now):
            self.owner.node.set_idle(self.client_id, True, now)
        if self.tunnel is not None:
            self.tunnel.handle_timeout(now, unix)
            while (datagram := self.tunnel.poll_transmit()) is not None:
                self._send(datagram)
            self._drain_tunnel_events(now)
        if self.client is not None:
            self.client.handle_timeout(now, unix)
            while self.client.poll_event() is not None:
                pass
            self._drop_client_if_empty()

    def poll_timeout(self) -> float | None:
        deadlines = [self.idle.poll_timeout()]
        if self.tunnel is not None:
            deadlines.append(self.tunnel.poll_timeout())
        if self.client is not None:
            deadlines.append(self.client.poll_timeout())
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def _drop_client_if_empty(self) -> None:
        if self.client is not None and self.client.is_empty():
            self.owner.unregister_tun(self.client_id)
            self.client = None

    def _drain_tunnel_events(self, now: float) -> None:
        if self.tunnel is None:
            return
        while (event := self.tunnel.poll_event()) is not None:
            if isinstance(event, ConnectionExpired):
                self.tunnel = None
                self.owner.session_failed(self.client_id, now)
                return

    def close(self) -> None:
        if self.client is not None:
            self.owner.unregister_tun(self.client_id)
        self.client = None
        self.tunnel = None


class GatewayUnderTest:
    """The gateway as the world sees it; see the module docstring."""

    def __init__(self, *, rng: Rng, host_ip: str, now: float, unix: float) -> None:
        self.rng = rng
        self._host_ip = host_ip
        self._port = 40000
        self._now = now
        self._unix = unix
        self.node = Node(rng=rng, now=now)
        self._sessions: dict[uuid.UUID, _Session] = {}
        self._tun_routes: dict[bytes, uuid.UUID] = {}
        self.udp: list[tuple[Address | None, Address, bytes]] = []
        self.tun: list[bytes] = []
        self._portal: list[tuple[str, dict[str, Any]]] = []
        self._connects: list[str] = []
        self.portal_errors = 0

    # ------------------------------------------------------------------ identity

    @property
    def public_key(self) -> str:
        return encode_key(self.node.public_key)

    @property
    def local_addresses(self) -> tuple[Address, ...]:
        """The bound UDP socket (rebound on a new port by every reset, as NodeActor does)."""
        return ((self._host_ip, self._port),)

    # ------------------------------------------------------------------ inputs

    def start(self) -> None:
        """The PortalActor connects with the node's key (``AttachPortal``)."""
        self._connects.append(self.public_key)

    def portal_message(self, event: str, payload: Any) -> None:
        try:
            message = parse_ingress(event, payload)
        except GatewayError:
            self.portal_errors += 1
            return
        now = self._now
        node = self.node
        if isinstance(message, Init):
            node.update_relays([], _turn_servers(message.relays), now)
        elif isinstance(message, AuthorizeFlow):
            self._authorize_flow(message, now)
        elif isinstance(message, RejectAccess):
            session = self._sessions.get(message.client_id)
            if session is not None:
                session.remove_resource(message.resource_id)
        elif isinstance(message, IceCandidates):
            node.add_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, InvalidateIceCandidates):
            node.remove_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, RelaysPresence):
            removed = [str(rid) for rid in message.disconnected_ids]
            node.update_relays(removed, _turn_servers(message.connected), now)
        elif isinstance(message, ResourceUpdated):
            for session in self._sessions.values():
                if session.client is not None:
                    session.client.update_resource(message.resource)
        self._drain(now)

    def datagram_in(self, local: Address, src: Address, data: bytes) -> None:
        if local not in self.local_addresses:
            return  # a socket closed by a reset
        wg = self.node.handle_datagram(local, src, data, self._now)
        if wg is not None:
            session = self._sessions.get(wg.client_id)
            if session is not None:
                session.from_network(wg.datagram, wg.src, self._now, self._unix)
        self._drain(self._now)

    def tun_packet_in(self, packet: bytes) -> None:
        dst = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
        client_id = self._tun_routes.get(dst)
        session = self._sessions.get(client_id) if client_id is not None else None
        if session is not None:
            session.from_tun(packet, self._now, self._unix)
        self._drain(self._now)

    def advance(self, now: float, unix: float) -> None:
        """The clock moved to ``now``: run every deadline due."""
        self._now, self._unix = now, unix
        deadline = self.node.poll_timeout()
        if deadline is not None and deadline <= now:
            self.node.handle_timeout(now)
        for session in list(self._sessions.values()):
            deadline = session.poll_timeout()
            if deadline is not None and deadline <= now:
                session.handle_timeout(now, unix)
        self._drain(now)

    def poll_timeout(self) -> float | None:
        deadlines = [self.node.poll_timeout()]
        deadlines += [s.poll_timeout() for s in self._sessions.values()]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def reset(self) -> None:
        """NodeActor._reset: rotate the key, stop every session, rebind, reconnect."""
        self.node.reset(self._now)
        for client_id in list(self._sessions):
            self._stop_session(client_id)
        self._port += 1
        self._connects.append(self.public_key)

    # ------------------------------------------------------------------ outputs

    def portal_out(self) -> list[tuple[str, dict[str, Any]]]:
        out, self._portal = self._portal, []
        return out

    def connect_requests(self) -> list[str]:
        out, self._connects = self._connects, []
        return out

    def datagrams_out(self) -> list[tuple[Address | None, Address, bytes]]:
        out, self.udp = self.udp, []
        return out

    def tun_out(self) -> list[bytes]:
        out, self.tun = self.tun, []
        return out

    # ------------------------------------------------------------------ combining

    def _authorize_flow(self, msg: AuthorizeFlow, now: float) -> None:
        client = msg.client
        result = self.node.upsert_connection(
            client.id, client_public_key=client.public_key_bytes,
            preshared_key=client.preshared_key_bytes, local=_ice(msg.gateway_ice_credentials),
            remote=_ice(msg.client_ice_credentials), now=now,
        )
        if isinstance(result, NoTurnServers):
            self._connects.append(self.public_key)  # NodeActor._refetch_relays
            return
        if isinstance(result, ConnectionCreated):
            session = self._sessions.get(client.id)
            if session is None:
                session = self._sessions[client.id] = _Session(self, client.id)
            session.new_session(result, now)
        session_or_none = self._sessions.get(client.id)
        if session_or_none is None:
            return
        session_or_none.authorize(msg, now)
        self._send_portal(encode_egress(FlowAuthorized(msg.ref)))

    def session_failed(self, client_id: uuid.UUID, now: float) -> None:
        """PeerFailed (WireGuard session expired): NodeActor._on_peer_failed."""
        self.node.remove_connection(client_id, "WireGuard connection expired")
        self._stop_session(client_id)

    def _stop_session(self, client_id: uuid.UUID) -> None:
        session = self._sessions.pop(client_id, None)
        if session is not None:
            session.close()

    def register_tun(self, client_id: uuid.UUID, ipv4: str, ipv6: str) -> None:
        self._tun_routes[ipaddress.ip_address(ipv4).packed] = client_id
        self._tun_routes[ipaddress.ip_address(ipv6).packed] = client_id

    def unregister_tun(self, client_id: uuid.UUID) -> None:
        for address in [a for a, c in self._tun_routes.items() if c == client_id]:
            del self._tun_routes[address]

    def _send_portal(self, event_payload: tuple[str, dict[str, Any]]) -> None:
        self._portal.append(event_payload)

    def _drain(self, now: float) -> None:
        node = self.node
        while (tx := node.poll_transmit()) is not None:
            self.udp.append((tx.src, tx.dst, tx.payload))
        while (event := node.poll_event()) is not None:
            if isinstance(event, CandidatesAdded):
                self._send_portal(encode_egress(
                    BroadcastIceCandidates((event.client_id,), event.candidates)))
            elif isinstance(event, CandidatesInvalidated):
                self._send_portal(encode_egress(
                    BroadcastInvalidatedIceCandidates((event.client_id,), event.candidates)))
            elif isinstance(event, PathChanged):
                session = self._sessions.get(event.client_id)
                if session is not None:
                    session.set_path(event.path, now)
            elif isinstance(event, ConnectionFailed):
                self._stop_session(event.client_id)


def _ice(creds: PortalIceCredentials) -> IceCredentials:
    return IceCredentials(creds.username, creds.password)


def _turn_servers(entries: Any) -> list[TurnServer]:
    servers = []
    for relay in merge_relays(entries):
        addresses = tuple(a for a in (relay.addr_v4, relay.addr_v6) if a is not None)
        servers.append(TurnServer(str(relay.id), addresses, relay.username, relay.password))
    return servers
