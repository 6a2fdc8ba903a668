"""The gateway's state machine: every decision that combines the portal, the node and the
client sessions, pure (the role of ``GatewayState`` in Firezone's
``rust/connlib/tunnel/src/gateway.rs``).

Inputs: parsed portal messages (:meth:`Gateway.handle_portal`), datagrams for the node
(:meth:`Gateway.handle_datagrams`), the clock (:meth:`Gateway.handle_timeout`), what the
shell learned while carrying out a command (a domain resolved, a client session that
could not be started or was found dead) and the sessions' own reports (failed, idle).

Outputs: :class:`Command` objects (:meth:`Gateway.poll_command`), the node's datagrams
(:meth:`Gateway.poll_transmit`) and the next deadline (:meth:`Gateway.poll_timeout`). The
shell (``actors/node.py``) carries them out in order, then sends the transmits, then arms
its timer at the deadline.

Commands that act on one client's session carry its ``client_id``. When the shell cannot
carry one out because the session is gone (its actor died), it reports
:meth:`Gateway.session_lost`: the client's connection is forgotten and every command still
queued for that client is dropped, so a reply that depended on it is never sent (1.4 sends
``flow_authorized`` only once access was given).

Route commands keep the UDP reader's fast path (``gateway/demux.py``) in step with the
sessions: a session's receiver-index prefix routes WireGuard transport data straight to it,
and its nominated relay channel routes ChannelData the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from gateway.demux import INDEX_SHIFT
from gateway.drops import Drop
from gateway.ice.candidate import IceCredentials
from gateway.node import (
    CandidatesAdded,
    CandidatesInvalidated,
    ConnectionCreated,
    ConnectionFailed,
    Node,
    NoTurnServers,
    Path,
    PathChanged,
    RelayedPath,
    TurnServer,
)
from gateway.peer import dns_nat_allowed
from gateway.portal.messages import (
    AllowAccess,
    AuthorizeFlow,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    ConnectionReady,
    EgressMessage,
    FlowAuthorized,
    IceCandidates,
    Init,
    InvalidateIceCandidates,
    PortalIceCredentials,
    RejectAccess,
    RelayEntry,
    RelaysPresence,
    RequestConnection,
    ResourceUpdated,
    merge_relays,
)
from gateway.resources import Resource
from gateway.types import Address, Rng, Transmit
from gateway.wg.keys import StaticKeyPair, encode_key
from gateway.wg.ratelimit import HandshakeRateLimiter

log = logging.getLogger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A legacy request that waits for its domain to be resolved.
LegacyRequest: TypeAlias = RequestConnection | AllowAccess


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class StartSession:
    """Start the client's session, or replace it: its WireGuard tunnel starts afresh."""

    client_id: uuid.UUID
    local_index: int
    peer_public: bytes
    preshared_key: bytes = field(repr=False)
    static: StaticKeyPair = field(repr=False)
    rate_limiter: HandshakeRateLimiter = field(repr=False)


@dataclass(frozen=True, slots=True)
class StopSession:
    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class AuthorizeResource:
    client_id: uuid.UUID
    resource: Resource
    expires_at: float | None
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class SetupDns:
    """Set up the DNS-resource NAT of a legacy request (its domain already resolved)."""

    client_id: uuid.UUID
    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class ForgetClient:
    """Drop the client's authorizations (its session and connection stay)."""

    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class RemoveResource:
    client_id: uuid.UUID
    resource_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class UpdateResource:
    client_id: uuid.UUID
    resource: Resource


@dataclass(frozen=True, slots=True)
class SetPath:
    client_id: uuid.UUID
    path: Path


@dataclass(frozen=True, slots=True)
class DeliverHandshakes:
    """WireGuard datagrams the node routed to the client (handshakes, cookie replies)."""

    client_id: uuid.UUID
    datagrams: list[tuple[bytes, Address]]


@dataclass(frozen=True, slots=True)
class SendToPortal:
    """Send ``message``; with ``client_id``, a reply that is dropped if the client's
    session is lost before it goes out."""

    message: EgressMessage
    client_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class ConnectPortal:
    """(Re)connect the portal with this key: a fresh ``init`` brings fresh relays."""

    public_key: str


@dataclass(frozen=True, slots=True)
class PortalKeyRotated:
    """The key was rotated: the portal logs in again with ``public_key``."""

    public_key: str


@dataclass(frozen=True, slots=True)
class ProtectKey:
    """A new private key exists: register it as a secret before anything may log it."""

    private_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rebind:
    """Close the UDP sockets and bind new ones (relays key allocations by 5-tuple)."""


@dataclass(frozen=True, slots=True)
class ConfigureInterface:
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class Resolve:
    """Resolve ``domain``; answer with :meth:`Gateway.handle_resolved` (``generation``
    included: after a reset the answer is for a key that is gone)."""

    domain: str
    request: LegacyRequest
    generation: int


@dataclass(frozen=True, slots=True)
class RouteAdded:
    """Transport data whose receiver index ``>> INDEX_SHIFT`` is ``key`` goes to the
    client's session directly."""

    key: int
    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class RouteRemoved:
    key: int


@dataclass(frozen=True, slots=True)
class RelayRouteAdded:
    """ChannelData from relay ``server`` on ``channel`` is unwrapped on the fast path and
    its transport data goes to its receiver index's session, as sent by ``remote``."""

    server: Address
    channel: int
    client_id: uuid.UUID
    remote: Address


@dataclass(frozen=True, slots=True)
class RelayRouteRemoved:
    server: Address
    channel: int


Command: TypeAlias = (
    StartSession | StopSession | AuthorizeResource | SetupDns | ForgetClient | RemoveResource
    | UpdateResource | SetPath | DeliverHandshakes | SendToPortal | ConnectPortal
    | PortalKeyRotated | ProtectKey | Rebind | ConfigureInterface | Resolve | RouteAdded
    | RouteRemoved | RelayRouteAdded | RelayRouteRemoved
)

#: Commands that give a session something: dropped with the session (removals never are).
_FOR_SESSION = (
    StartSession, AuthorizeResource, SetupDns, ForgetClient, RemoveResource, UpdateResource,
    SetPath, DeliverHandshakes, RouteAdded, RelayRouteAdded, SendToPortal,
)


@dataclass(slots=True)
class _Session:
    """What the gateway published for one client's session."""

    route_key: int | None = None
    relay_key: tuple[Address, int] | None = None


class Gateway:
    """The gateway's state machine; owns the :class:`~gateway.node.Node` core. See the
    module docstring for the contract."""

    def __init__(self, *, rng: Rng, now: float, node: Node | None = None) -> None:
        self.node = node if node is not None else Node(rng=rng, now=now)
        #: Resets so far: a legacy request resolved across a reset is dropped.
        self.resets = 0
        #: Clients with a session (bounded by the node's connections: a session exists
        #: only for a connection, and ends with it).
        self._sessions: dict[uuid.UUID, _Session] = {}
        self._commands: deque[Command] = deque()

    # ------------------------------------------------------------------ outputs

    @property
    def public_key(self) -> str:
        return encode_key(self.node.public_key)

    def poll_command(self) -> Command | None:
        return self._commands.popleft() if self._commands else None

    def poll_transmit(self) -> Transmit | None:
        return self.node.poll_transmit()

    def poll_timeout(self) -> float | None:
        return self.node.poll_timeout()

    def sessions(self) -> list[uuid.UUID]:
        return list(self._sessions)

    def session_to_check(
        self, message: object, resolved_generation: int | None = None
    ) -> uuid.UUID | None:
        """The client whose session this input is about to use: the shell checks it is
        still alive first, and reports a dead one with :meth:`session_lost` (a failed
        client's flow builds a fresh connection). ``resolved_generation``: the input is
        the answer to a :class:`Resolve` command for this legacy request."""
        resolved = resolved_generation is not None
        if resolved and resolved_generation != self.resets:
            return None  # dropped unused
        if isinstance(message, AuthorizeFlow):
            return message.client.id
        if isinstance(message, RequestConnection) and (
            resolved or message.client.domain is None
        ):
            return message.client.id
        if isinstance(message, AllowAccess) and (resolved or message.payload is None):
            return message.client_id
        return None

    # ------------------------------------------------------------------ inputs

    def portal_attached(self) -> None:
        """A (new) portal connection wants to log in."""
        self._commands.append(ConnectPortal(self.public_key))

    def handle_portal(self, message: object, now: float) -> None:
        if isinstance(message, Init):
            self._on_init(message, now)
        elif isinstance(message, AuthorizeFlow):
            self._on_authorize_flow(message, now)
        elif isinstance(message, RequestConnection):
            if message.client.domain is None:
                self._accept_request(message, (), now)
            else:
                self._resolve(message, message.client.domain.name)
        elif isinstance(message, AllowAccess):
            if message.payload is None:
                self._allow(message, ())
            else:
                self._resolve(message, message.payload.name)
        elif isinstance(message, RejectAccess):
            if message.client_id in self._sessions:  # a gone session took every access
                self._commands.append(RemoveResource(message.client_id, message.resource_id))
        elif isinstance(message, IceCandidates):
            self.node.add_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, InvalidateIceCandidates):
            self.node.remove_remote_candidates(message.client_id, message.candidates, now)
        elif isinstance(message, RelaysPresence):
            removed = [str(rid) for rid in message.disconnected_ids]
            self.node.update_relays(removed, turn_servers(message.connected), now)
        elif isinstance(message, ResourceUpdated):
            for client_id in self._sessions:
                self._commands.append(UpdateResource(client_id, message.resource))
        else:
            log.warning("ignoring portal message %s", type(message).__name__)
        self._drain_node()

    def handle_resolved(
        self, request: LegacyRequest, addresses: Iterable[IPAddress], generation: int,
        now: float,
    ) -> None:
        """The answer to a :class:`Resolve` command."""
        if generation != self.resets:
            log.info("%s dropped: the gateway reset while its domain was looked up",
                     type(request).__name__)
        elif isinstance(request, RequestConnection):
            self._accept_request(request, tuple(addresses), now)
        else:
            self._allow(request, tuple(addresses))
        self._drain_node()

    def handle_datagrams(
        self, batch: Iterable[tuple[Address, Address, bytes]], now: float
    ) -> None:
        """Datagrams the fast path left to the node: ``(local, source, bytes)``."""
        per_client: dict[uuid.UUID, list[tuple[bytes, Address]]] = {}
        node = self.node
        for local, src, data in batch:
            wg = node.handle_datagram(local, src, data, now)
            if wg is not None:
                per_client.setdefault(wg.client_id, []).append((wg.datagram, wg.src))
        for client_id, datagrams in per_client.items():
            if client_id in self._sessions:
                self._commands.append(DeliverHandshakes(client_id, datagrams))
            else:
                node.counters[Drop.HANDSHAKE_NO_PEER] += len(datagrams)
        self._drain_node()

    def note_channel_activity(self, seen: Iterable[tuple[Address, int]], now: float) -> None:
        """Channels the fast path unwrapped data from (the relay's channel-refresh rule)."""
        for server, number in seen:
            self.node.note_channel_data(server, number, now)

    def handle_timeout(self, now: float) -> None:
        self.node.handle_timeout(now)
        self._drain_node()

    def session_idle(self, client_id: uuid.UUID, idle: bool, now: float) -> None:
        self.node.set_idle(client_id, idle, now)
        self._drain_node()

    def session_failed(self, client_id: uuid.UUID, reason: str) -> None:
        """The client's session reported its own failure: that client only ends."""
        log.info("client %s: %s; connection forgotten", client_id, reason)
        self.node.remove_connection(client_id, reason)
        self._end_session(client_id)

    def session_lost(self, client_id: uuid.UUID, reason: str = "its PeerActor failed") -> None:
        """The shell found the client's session gone (or could not start it): its
        connection is forgotten and what was queued for it is dropped."""
        self.node.remove_connection(client_id, reason)
        self._commands = deque(
            c for c in self._commands
            if not (isinstance(c, _FOR_SESSION) and c.client_id == client_id)
        )
        self._end_session(client_id)

    def reset(self, reason: str, now: float) -> None:
        """Rotate the key and drop every connection and session; the shell rebinds its
        sockets, and the portal logs in again with the new key (module doc of
        ``actors/node.py``)."""
        log.info("reset (%s): rotating the WireGuard key and dropping every connection",
                 reason)
        self.node.reset(now)
        self._commands.append(ProtectKey(self.node.static.private))
        for client_id in list(self._sessions):
            self._end_session(client_id)
        self._commands.append(Rebind())
        self.resets += 1
        self._commands.append(PortalKeyRotated(self.public_key))

    def shutdown(self, now: float) -> None:
        """Graceful stop: free the relay allocations (see :meth:`Node.shutdown`)."""
        self.node.shutdown(now)

    # ------------------------------------------------------------------ portal

    def _on_init(self, init: Init, now: float) -> None:
        log.info("init: interface %s / %s, %d relay entries", init.interface.ipv4,
                 init.interface.ipv6, len(init.relays))
        self.node.update_relays([], turn_servers(init.relays), now)
        self._commands.append(
            ConfigureInterface(str(init.interface.ipv4), str(init.interface.ipv6))
        )

    def _on_authorize_flow(self, msg: AuthorizeFlow, now: float) -> None:
        client = msg.client
        result = self.node.upsert_connection(
            client.id,
            client_public_key=client.public_key_bytes,
            preshared_key=client.preshared_key_bytes,
            local=ice_credentials(msg.gateway_ice_credentials),
            remote=ice_credentials(msg.client_ice_credentials),
            now=now,
        )
        if isinstance(result, NoTurnServers):
            self._refetch_relays()
            return
        if isinstance(result, ConnectionCreated):
            self._start_session(result)
        elif client.id not in self._sessions:
            log.error("authorize_flow for %s: no session after upsert", client.id)
            return
        self._commands.append(AuthorizeResource(
            client.id, msg.resource, msg.expires_at, str(client.ipv4), str(client.ipv6)))
        self._commands.append(SendToPortal(FlowAuthorized(msg.ref), client.id))

    def _resolve(self, request: LegacyRequest, domain: str) -> None:
        """1.4 resolves a legacy request's domain first, then accepts and allows."""
        self._commands.append(Resolve(domain, request, self.resets))

    def _accept_request(
        self, msg: RequestConnection, addresses: tuple[IPAddress, ...], now: float
    ) -> None:
        """Accept a legacy connection, allow access, and answer ``connection_ready`` only
        if the DNS-resource NAT can be set up (1.4's ``request_connection``)."""
        client = msg.client
        result = self.node.accept_connection(
            client.id,
            client_public_key=client.peer.public_key_bytes,
            preshared_key=client.peer.preshared_key_bytes,
            remote=ice_credentials(client.ice_parameters),
            now=now,
        )
        if isinstance(result, NoTurnServers):
            self._refetch_relays()
            return
        assert isinstance(result, ConnectionCreated)
        self._start_session(result)
        domain = client.domain
        if domain is not None and not dns_nat_allowed(msg.resource, domain.name):
            # 1.4 adds the resource, fails the NAT set-up and removes the client's state;
            # the connection stays (it fails without remote candidates) and nothing is sent.
            log.warning("request_connection from %s: %s is not a name of resource %s; "
                        "no access and no reply", client.id, domain.name, msg.resource.id)
            self._commands.append(ForgetClient(client.id))
            return
        self._commands.append(AuthorizeResource(
            client.id, msg.resource, msg.expires_at, str(client.peer.ipv4),
            str(client.peer.ipv6)))
        if domain is not None:
            self._commands.append(SetupDns(
                client.id, msg.resource.id, domain.name, domain.proxy_ips, addresses))
        creds = result.local_credentials
        reply = ConnectionReady(msg.ref, PortalIceCredentials(creds.ufrag, creds.pwd))
        self._commands.append(SendToPortal(reply, client.id))

    def _allow(self, msg: AllowAccess, addresses: tuple[IPAddress, ...]) -> None:
        """Legacy ``allow_access``: no reply; a failed NAT set-up is logged."""
        if msg.client_id not in self._sessions:
            log.warning("allow_access for %s without a connection; ignored", msg.client_id)
            return
        self._commands.append(AuthorizeResource(
            msg.client_id, msg.resource, msg.expires_at, str(msg.client_ipv4),
            str(msg.client_ipv6)))
        if msg.payload is not None:
            request = msg.payload
            self._commands.append(SetupDns(
                msg.client_id, msg.resource.id, request.name, request.proxy_ips, addresses))

    def _refetch_relays(self) -> None:
        """No relay known: reconnect the portal with the same key to get a fresh ``init``."""
        log.warning("no TURN servers; reconnecting to the portal for fresh relays")
        self._commands.append(ConnectPortal(self.public_key))

    # ------------------------------------------------------------------ sessions

    def _start_session(self, created: ConnectionCreated) -> None:
        client_id = created.client_id
        session = self._sessions.get(client_id)
        if session is None:
            session = self._sessions[client_id] = _Session()
        if session.route_key is not None:
            self._commands.append(RouteRemoved(session.route_key))
        node = self.node
        self._commands.append(StartSession(
            client_id, created.local_index, created.peer_public, created.preshared_key,
            node.static, node.rate_limiter))
        session.route_key = created.local_index >> INDEX_SHIFT
        self._commands.append(RouteAdded(session.route_key, client_id))

    def _end_session(self, client_id: uuid.UUID) -> None:
        session = self._sessions.pop(client_id, None)
        if session is None:
            return
        if session.relay_key is not None:
            self._commands.append(RelayRouteRemoved(*session.relay_key))
        if session.route_key is not None:
            self._commands.append(RouteRemoved(session.route_key))
        self._commands.append(StopSession(client_id))

    def _path_changed(self, client_id: uuid.UUID, path: Path) -> None:
        session = self._sessions.get(client_id)
        if session is None:
            return
        self._commands.append(SetPath(client_id, path))
        if session.relay_key is not None:
            self._commands.append(RelayRouteRemoved(*session.relay_key))
            session.relay_key = None
        if isinstance(path, RelayedPath) and session.route_key is not None:
            session.relay_key = (path.server, path.channel)
            self._commands.append(
                RelayRouteAdded(path.server, path.channel, client_id, path.remote))

    # ------------------------------------------------------------------ node events

    def _drain_node(self) -> None:
        while (event := self.node.poll_event()) is not None:
            if isinstance(event, CandidatesAdded):
                self._commands.append(SendToPortal(
                    BroadcastIceCandidates((event.client_id,), event.candidates)))
            elif isinstance(event, CandidatesInvalidated):
                self._commands.append(SendToPortal(
                    BroadcastInvalidatedIceCandidates((event.client_id,), event.candidates)))
            elif isinstance(event, PathChanged):
                self._path_changed(event.client_id, event.path)
            elif isinstance(event, ConnectionFailed):
                self._end_session(event.client_id)


def ice_credentials(creds: PortalIceCredentials) -> IceCredentials:
    """The portal's ICE credentials as the ICE agent takes them."""
    return IceCredentials(creds.username, creds.password)


def turn_servers(entries: Iterable[RelayEntry]) -> list[TurnServer]:
    """The portal's relay entries as the node's TURN servers (dual-stack entries merged)."""
    servers = []
    for relay in merge_relays(entries):
        addresses = tuple(a for a in (relay.addr_v4, relay.addr_v6) if a is not None)
        servers.append(TurnServer(str(relay.id), addresses, relay.username, relay.password))
    return servers
