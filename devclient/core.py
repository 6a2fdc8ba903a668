"""The development client's protocol logic, sans-IO: portal messages, ICE, TURN, WireGuard.

Theory of operation
-------------------
* ``init`` names our tunnel addresses, the resources and the relays. We answer with an
  :class:`InterfaceConfig` (the shell configures the TUN), one TURN :class:`Allocation` per
  relay (server-reflexive and relayed candidates), and ``create_flow`` for every resource
  the user asked for.
* ``flow_created`` names a gateway. One :class:`GatewayConnection` per gateway holds the
  ICE agent (we are *controlling*; local credentials = ``client_ice_credentials``) and the
  WireGuard :class:`Tunnel` (we are the *initiator*). A second flow to the same gateway with
  the same key and credentials reuses the connection; a new key or new credentials (the
  gateway reset) replace it.
* Candidates trickle both ways via the portal. With ``relay_only`` we signal and pair only
  relayed candidates, so every path goes through a TURN channel.
* Once ICE nominates a pair we know the path (direct, or ChannelData through a relay) and
  send the handshake initiation. ``HandshakeCompleted`` makes the connection ready; then
  DNS resources get their AssignedIps (retransmitted every 2 s until a DomainStatus).
* Packets from the TUN are routed by destination: a DNS proxy IP or the longest matching
  CIDR resource picks the resource, the resource picks the connection. Traffic for a
  resource without a connection re-requests its flow (at most every 2 s), as the real
  client does.

Sans-IO: ``handle_*`` take bytes/messages and ``now``; the shell drains ``poll_transmit``
(UDP), ``poll_tun`` (TUN writes), ``poll_portal`` (pushes) and ``poll_event`` (what to print
and configure), and wakes up at ``poll_timeout``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.demux import DatagramKind, classify
from gateway.errors import MalformedPacket
from gateway.ice.agent import Disconnected, IceAgent, Nominated
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.packet import p2p_control
from gateway.packet.ip import RESOURCES_V4, RESOURCES_V6
from gateway.portal.messages import parse_socket_address
from gateway.stun.message import parse as parse_stun
from gateway.turn.allocation import (
    Allocation,
    AllocationFailed,
    CandidateAdded,
    CandidateRemoved,
)
from gateway.types import Address, Rng, Transmit, format_address
from gateway.wg.keys import StaticKeyPair, decode_key
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import (
    ConnectionExpired,
    HandshakeCompleted,
    Tunnel,
    WriteToNetwork,
    WriteToTunnel,
    message_type,
    receiver_index,
)

log = logging.getLogger(__name__)

#: How often AssignedIps is re-sent until the gateway answers (the real client: 2 s).
ASSIGNED_IPS_RETRY = 2.0
#: Traffic re-requests a flow at most this often per resource.
FLOW_REQUEST_INTERVAL = 2.0
#: A connection without a usable path after this long has failed.
CONNECT_TIMEOUT = 20.0
#: WireGuard datagrams kept while no path exists yet (snownet buffers 10).
PENDING_DATAGRAMS = 10
#: Proxy IPs per family and domain (the real client always assigns 4 + 4).
PROXY_IPS_PER_FAMILY = 4
SOFTWARE = "pyfz-devclient"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """Configure the TUN: these addresses (/32, /128) and routes through it."""

    ipv4: str
    ipv6: str
    routes: tuple[str, ...]

    def line(self) -> str:
        return f"INTERFACE ipv4={self.ipv4} ipv6={self.ipv6} routes={','.join(self.routes)}"


@dataclass(frozen=True, slots=True)
class Ready:
    resource: str
    gateway: str
    path: str

    def line(self) -> str:
        return f"READY resource={self.resource} gateway={self.gateway} path={self.path}"


@dataclass(frozen=True, slots=True)
class Failed:
    resource: str
    reason: str

    def line(self) -> str:
        return f"FAILED resource={self.resource} reason={self.reason.replace(' ', '_')}"


@dataclass(frozen=True, slots=True)
class DnsMapping:
    resource: str
    domain: str
    proxy_ips: tuple[str, ...]
    status: str

    def line(self) -> str:
        return (f"DNS resource={self.resource} domain={self.domain} "
                f"proxy_ips={','.join(self.proxy_ips)} status={self.status}")


ClientEvent = InterfaceConfig | Ready | Failed | DnsMapping


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    type: str
    address: str
    name: str

    @classmethod
    def from_portal(cls, raw: Mapping[str, Any]) -> Resource:
        return cls(str(raw["id"]), str(raw["type"]), str(raw.get("address") or ""),
                   str(raw.get("name") or ""))

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        if self.type == "internet":
            return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        if self.type == "cidr":
            try:
                return [ipaddress.ip_network(self.address, strict=False)]
            except ValueError:
                return []
        return []


@dataclass(frozen=True, slots=True)
class FlowCreated:
    """The parsed ``flow_created`` payload (keys decoded, credentials typed)."""

    resource_id: str
    gateway_id: str
    gateway_public_key: bytes
    gateway_ipv4: str | None
    gateway_ipv6: str | None
    client_credentials: IceCredentials
    gateway_credentials: IceCredentials
    preshared_key: bytes

    @classmethod
    def parse(cls, payload: Mapping[str, Any]) -> FlowCreated:
        """Raises ``ValueError``/``KeyError``/``TypeError`` on a malformed payload."""

        def creds(raw: Mapping[str, Any]) -> IceCredentials:
            ufrag, pwd = raw["username"], raw["password"]
            if not isinstance(ufrag, str) or not isinstance(pwd, str) or not ufrag or not pwd:
                raise ValueError("ICE credentials must be non-empty strings")
            return IceCredentials(ufrag, pwd)

        return cls(
            resource_id=str(payload["resource_id"]),
            gateway_id=str(payload["gateway_id"]),
            gateway_public_key=decode_key(payload["gateway_public_key"]),
            gateway_ipv4=payload.get("gateway_ipv4"),
            gateway_ipv6=payload.get("gateway_ipv6"),
            client_credentials=creds(payload["client_ice_credentials"]),
            gateway_credentials=creds(payload["gateway_ice_credentials"]),
            preshared_key=decode_key(payload["preshared_key"]),
        )


@dataclass(frozen=True, slots=True)
class DirectPath:
    local: Address
    remote: Address
    name = "direct"


@dataclass(frozen=True, slots=True)
class RelayedPath:
    relay_id: str
    remote: Address
    name = "relay"


Path = DirectPath | RelayedPath


@dataclass(slots=True)
class DnsAssignment:
    resource_id: str
    domain: str
    proxy_ips: tuple[str, ...]
    status: str | None = None
    next_send: float | None = None


@dataclass(slots=True)
class GatewayConnection:
    gateway_id: str
    public_key: bytes
    local_credentials: IceCredentials
    psk: bytes = field(repr=False)
    agent: IceAgent
    tunnel: Tunnel
    created_at: float
    resources: set[str] = field(default_factory=set)
    path: Path | None = None
    nominated: tuple[Candidate, Address] | None = None
    ready: bool = False
    pending: deque[bytes] = field(default_factory=lambda: deque(maxlen=PENDING_DATAGRAMS))
    signalled: set[str] = field(default_factory=set)


def parse_address(text: str) -> Address:
    """``ip:port`` or ``[v6]:port`` (as the portal spells relay addresses)."""
    return parse_socket_address(text, "relay address")


class ProxyIpPool:
    """Hands out proxy IPs for DNS-resource domains, stable per domain for the process life."""

    def __init__(self) -> None:
        self._next_v4 = int(RESOURCES_V4.network_address) + 1
        self._next_v6 = int(RESOURCES_V6.network_address) + 1
        self._by_domain: dict[str, tuple[str, ...]] = {}

    def assign(self, domain: str) -> tuple[str, ...]:
        domain = domain.rstrip(".").lower()
        if domain in self._by_domain:
            return self._by_domain[domain]
        v4 = [ipaddress.IPv4Address(self._next_v4 + i) for i in range(PROXY_IPS_PER_FAMILY)]
        v6 = [ipaddress.IPv6Address(self._next_v6 + i) for i in range(PROXY_IPS_PER_FAMILY)]
        if v4[-1] not in RESOURCES_V4 or v6[-1] not in RESOURCES_V6:
            raise RuntimeError("proxy IP range exhausted")
        self._next_v4 += PROXY_IPS_PER_FAMILY
        self._next_v6 += PROXY_IPS_PER_FAMILY
        ips = tuple(str(ip) for ip in (*v4, *v6))
        self._by_domain[domain] = ips
        return ips


# --------------------------------------------------------------------------- core


class ClientCore:
    """See the module docstring for the contract."""

    def __init__(
        self,
        *,
        rng: Rng,
        now: float,
        unix_now: float,
        relay_only: bool = False,
        dns_domains: Mapping[str, str] | None = None,
        static: StaticKeyPair | None = None,
    ) -> None:
        self._rng = rng
        self.static = static or StaticKeyPair.generate(rng)
        self._limiter = HandshakeRateLimiter(self.static.public, rng)
        self.relay_only = relay_only
        self._dns_domains = dict(dns_domains or {})
        self._now = now
        # Wall clock minus monotonic clock: TAI64N timestamps of initiations we start from
        # internal callbacks must increase, so they are derived from the latest wall clock.
        self._unix_delta = unix_now - now
        self._local: Address | None = None
        self._initialized = False
        self._interface: InterfaceConfig | None = None
        self._resources: dict[str, Resource] = {}
        self._relay_config: dict[str, tuple[tuple[Address, ...], str, str]] = {}
        self._allocations: dict[str, Allocation] = {}
        self._server_to_relay: dict[Address, str] = {}
        self._connections: dict[str, GatewayConnection] = {}
        self._resource_gateway: dict[str, str] = {}
        self._wanted: list[str] = []  # as the user named them (id or name)
        self._requested_at: dict[str, float] = {}
        self._early_candidates: dict[str, list[str]] = {}
        # gateway id -> (public key, our ICE credentials, PSK) of connections dropped by a roam
        self._roamed: dict[str, tuple[bytes, IceCredentials, bytes]] = {}
        self._proxy_pool = ProxyIpPool()
        self._dns: dict[str, DnsAssignment] = {}  # resource id -> assignment
        self._proxy_to_resource: dict[bytes, str] = {}
        #: Destination -> resource answers of ``_resource_for`` (cleared on any change).
        self._route_cache: dict[bytes, str | None] = {}
        self._transmits: deque[Transmit] = deque()
        self._tun_out: deque[bytes] = deque()
        self._portal_out: deque[tuple[str, dict[str, Any]]] = deque()
        self._events: deque[ClientEvent] = deque()
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ identity, setup

    @property
    def public_key(self) -> str:
        return self.static.public_b64()

    def set_local_address(self, local: Address) -> None:
        """The bound UDP socket: our host candidate (and the base of server-reflexive ones)."""
        self._local = local

    def request(self, resource: str, now: float) -> None:
        """Ask for ``resource`` (id or name); sent once ``init`` told us the resources."""
        if resource not in self._wanted:
            self._wanted.append(resource)
        if self._initialized:
            self._request_flow(resource, now)

    def roam(self, local: Address, now: float) -> None:
        """Our socket moved: drop every connection and allocation, re-request every flow."""
        self._now = now
        self._local = local
        for conn in list(self._connections.values()):
            # The gateway keeps its side (same ICE credentials: the portal's upsert reuses
            # it and ignores the new flow's PSK), so our next tunnel must use the old PSK.
            self._roamed[conn.gateway_id] = (conn.public_key, conn.local_credentials, conn.psk)
            self._drop_connection(conn, None)
        self._allocations.clear()
        self._server_to_relay.clear()
        self._transmits.clear()
        self._requested_at.clear()
        for relay_id, (servers, username, password) in self._relay_config.items():
            self._allocate(relay_id, servers, username, password, now)
        for dns in self._dns.values():
            dns.status = None
            dns.next_send = None
        if self._initialized:
            for resource in self._wanted:
                self._request_flow(resource, now)

    # ------------------------------------------------------------------ portal input

    def handle_portal_message(
        self, event: str, payload: Any, now: float, unix_now: float
    ) -> None:
        """One pushed event on topic ``client``; malformed payloads are logged and dropped."""
        self._clock(now, unix_now)
        try:
            if event == "init":
                self._on_init(payload, now)
            elif event == "flow_created":
                self._on_flow_created(FlowCreated.parse(payload), now)
            elif event == "flow_creation_failed":
                resource = str(payload["resource_id"])
                self._requested_at.pop(resource, None)
                self._events.append(Failed(resource, str(payload.get("reason", "unknown"))))
            elif event == "ice_candidates":
                self._on_remote_candidates(str(payload["gateway_id"]), payload["candidates"], now)
            elif event == "invalidate_ice_candidates":
                self._on_invalidated(str(payload["gateway_id"]), payload["candidates"], now)
            elif event == "relays_presence":
                self._on_relays_presence(payload, now)
            else:
                self.counters["portal_event_ignored"] += 1
                log.debug("ignoring portal event %s", event)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.counters["portal_message_malformed"] += 1
            log.warning("malformed %s from the portal: %r", event, exc)

    def _on_init(self, payload: Mapping[str, Any], now: float) -> None:
        interface = payload["interface"]
        self._resources = {}
        self._route_cache.clear()
        for raw in payload.get("resources") or []:
            resource = Resource.from_portal(raw)
            self._resources[resource.id] = resource
        routes = [str(RESOURCES_V4), str(RESOURCES_V6)]
        for resource in self._resources.values():
            if resource.type == "cidr":
                routes += [str(n) for n in resource.networks() if str(n) not in routes]
        config = InterfaceConfig(str(interface["ipv4"]), str(interface["ipv6"]), tuple(routes))
        if config != self._interface:
            self._interface = config
            self._events.append(config)
        self._update_relays((), payload.get("relays") or [], now)
        self._initialized = True
        for wanted in self._wanted:
            rid = self._resolve(wanted)
            if rid is None or rid not in self._resource_gateway:
                self._request_flow(wanted, now)

    def _on_relays_presence(self, payload: Mapping[str, Any], now: float) -> None:
        self._update_relays(payload.get("disconnected_ids") or [],
                            payload.get("connected") or [], now)

    def _update_relays(
        self, removed: Iterable[str], added: Iterable[Mapping[str, Any]], now: float
    ) -> None:
        for relay_id in removed:
            self._relay_config.pop(str(relay_id), None)
            self._remove_allocation(str(relay_id), now)
        grouped: dict[str, tuple[list[Address], str, str]] = {}
        for raw in added:
            if raw.get("type", "turn") != "turn":
                continue
            address = parse_address(str(raw["addr"]))
            if self._local is not None and (":" in address[0]) != (":" in self._local[0]):
                continue  # our single socket cannot reach the other family
            relay_id = str(raw["id"])
            entry = grouped.setdefault(relay_id, ([], str(raw["username"]), str(raw["password"])))
            entry[0].append(address)
        for relay_id, (servers, username, password) in grouped.items():
            config = (tuple(servers), username, password)
            if self._relay_config.get(relay_id) == config and relay_id in self._allocations:
                continue
            self._remove_allocation(relay_id, now)
            self._relay_config[relay_id] = config
            self._allocate(relay_id, config[0], username, password, now)

    def _allocate(
        self, relay_id: str, servers: tuple[Address, ...], username: str, password: str,
        now: float,
    ) -> None:
        log.info("allocating on relay %s at %s", relay_id,
                 ", ".join(format_address(s) for s in servers))
        allocation = Allocation(relay_id=relay_id, servers=servers, username=username,
                                password=password, software=SOFTWARE, rng=self._rng, now=now)
        self._allocations[relay_id] = allocation
        for server in allocation.server_addresses():
            self._server_to_relay[server] = relay_id
        self._drain_allocation(allocation, now)

    def _remove_allocation(self, relay_id: str, now: float) -> None:
        allocation = self._allocations.pop(relay_id, None)
        if allocation is None:
            return
        for server in allocation.server_addresses():
            self._server_to_relay.pop(server, None)
        gone = [Candidate.relay(a, relay_id) for a in allocation.relay_addresses()]
        for conn in list(self._connections.values()):
            for candidate in gone:
                conn.agent.invalidate_local_candidate(candidate.address, now)
            self._signal(conn, gone, invalidate=True)
            if isinstance(conn.path, RelayedPath) and conn.path.relay_id == relay_id:
                self._drop_connection(conn, f"relay {relay_id} gone")
            else:
                self._drain_agent(conn, now)

    # ------------------------------------------------------------------ flows

    def _resolve(self, resource: str) -> str | None:
        if resource in self._resources:
            return resource
        for candidate in self._resources.values():
            if candidate.name == resource:
                return candidate.id
        return None

    def _request_flow(self, resource: str, now: float) -> None:
        rid = self._resolve(resource)
        if rid is None:
            self._events.append(Failed(resource, "unknown_resource"))
            return
        res = self._resources[rid]
        if res.type == "dns" and rid not in self._dns:
            domain = (self._dns_domains.get(rid) or self._dns_domains.get(res.name)
                      or self._dns_domains.get(resource) or res.address)
            if "*" in domain or "?" in domain:
                self._events.append(Failed(rid, "dns_resource_needs_--dns-domain"))
                return
            ips = self._proxy_pool.assign(domain)
            self._dns[rid] = DnsAssignment(rid, domain.rstrip(".").lower(), ips)
            for ip in ips:
                self._proxy_to_resource[ipaddress.ip_address(ip).packed] = rid
            self._route_cache.clear()
        self._requested_at[rid] = now
        log.info("requesting a flow to resource %s", rid)
        self._portal_out.append(("create_flow", {"resource_id": rid}))

    def _on_flow_created(self, flow: FlowCreated, now: float) -> None:
        self._requested_at.pop(flow.resource_id, None)
        roamed = self._roamed.pop(flow.gateway_id, None)
        if roamed is not None and roamed[:2] == (flow.gateway_public_key,
                                                 flow.client_credentials):
            flow = dataclasses.replace(flow, preshared_key=roamed[2])
        conn = self._connections.get(flow.gateway_id)
        if conn is not None and (conn.public_key != flow.gateway_public_key
                                 or conn.local_credentials != flow.client_credentials):
            log.info("gateway %s has a new key or credentials: replacing the connection",
                     flow.gateway_id)
            others = sorted(conn.resources - {flow.resource_id})
            self._drop_connection(conn, None)
            conn = None
            for rid in others:  # the reset gateway forgot their authorizations too
                self._request_flow(rid, now)
        if conn is None:
            conn = self._new_connection(flow, now)
        previous = self._resource_gateway.get(flow.resource_id)
        if previous is not None and previous != flow.gateway_id:
            old = self._connections.get(previous)
            if old is not None:
                old.resources.discard(flow.resource_id)
        conn.resources.add(flow.resource_id)
        self._resource_gateway[flow.resource_id] = flow.gateway_id
        if conn.ready:
            self._announce_resource(conn, flow.resource_id, now)

    def _new_connection(self, flow: FlowCreated, now: float) -> GatewayConnection:
        agent = IceAgent(controlling=True, local=flow.client_credentials,
                         remote=flow.gateway_credentials, rng=self._rng, now=now)
        index = self._rng.getrandbits(24) << 8
        while index == 0 or any(c.tunnel.owns_index(index) for c in self._connections.values()):
            index = self._rng.getrandbits(24) << 8
        tunnel = Tunnel(static=self.static, peer_public=flow.gateway_public_key,
                        preshared_key=flow.preshared_key, local_index=index,
                        rate_limiter=self._limiter, rng=self._rng, now=now,
                        persistent_keepalive=25.0)
        conn = GatewayConnection(flow.gateway_id, flow.gateway_public_key,
                                 flow.client_credentials, flow.preshared_key, agent, tunnel, now)
        self._connections[flow.gateway_id] = conn
        log.info("connecting to gateway %s", flow.gateway_id)
        local: list[Candidate] = []
        signal_only: list[Candidate] = []
        if not self.relay_only and self._local is not None:
            local.append(Candidate.host(self._local))
            for allocation in self._allocations.values():
                for mapped, base in allocation.srflx_addresses():
                    signal_only.append(Candidate.srflx(mapped, base))
        for relay_id, allocation in self._allocations.items():
            local += [Candidate.relay(a, relay_id) for a in allocation.relay_addresses()]
        for candidate in local:
            agent.add_local_candidate(candidate, now)
        self._signal(conn, local + signal_only)
        early = self._early_candidates.pop(flow.gateway_id, None)
        if early:
            self._on_remote_candidates(flow.gateway_id, early, now)
        self._drain_agent(conn, now)
        return conn

    def _drop_connection(self, conn: GatewayConnection, reason: str | None) -> None:
        """Forget ``conn``; with a reason its resources are reported as failed."""
        if self._connections.get(conn.gateway_id) is conn:
            del self._connections[conn.gateway_id]
        for rid in sorted(conn.resources):
            if self._resource_gateway.get(rid) == conn.gateway_id:
                del self._resource_gateway[rid]
            if reason is not None:
                self._events.append(Failed(rid, reason))
        if reason is not None:
            log.info("connection to gateway %s failed: %s", conn.gateway_id, reason)

    def _signal(self, conn: GatewayConnection, candidates: Iterable[Candidate], *,
                invalidate: bool = False) -> None:
        lines = []
        for candidate in candidates:
            sdp = candidate.to_sdp()
            if invalidate:
                if sdp in conn.signalled:
                    conn.signalled.discard(sdp)
                    lines.append(sdp)
            elif sdp not in conn.signalled:
                conn.signalled.add(sdp)
                lines.append(sdp)
        if lines:
            event = ("broadcast_invalidated_ice_candidates" if invalidate
                     else "broadcast_ice_candidates")
            self._portal_out.append((event, {"gateway_ids": [conn.gateway_id],
                                             "candidates": sorted(lines)}))

    def _on_remote_candidates(self, gateway_id: str, lines: Iterable[str], now: float) -> None:
        conn = self._connections.get(gateway_id)
        if conn is None:
            self._early_candidates.setdefault(gateway_id, []).extend(str(x) for x in lines)
            return
        for line in lines:
            try:
                candidate = Candidate.parse(str(line))
            except ValueError as exc:
                self.counters["bad_remote_candidate"] += 1
                log.warning("ignoring candidate from gateway %s: %s", gateway_id, exc)
                continue
            conn.agent.add_remote_candidate(candidate, now)
            for allocation in self._allocations.values():
                allocation.bind_channel(candidate.address, now)
                self._drain_allocation(allocation, now)
        self._drain_agent(conn, now)

    def _on_invalidated(self, gateway_id: str, lines: Iterable[str], now: float) -> None:
        conn = self._connections.get(gateway_id)
        if conn is None:
            return
        for line in lines:
            try:
                conn.agent.invalidate_remote_candidate(Candidate.parse(str(line)), now)
            except ValueError:
                self.counters["bad_remote_candidate"] += 1
        self._drain_agent(conn, now)

    # ------------------------------------------------------------------ datagrams

    def handle_datagram(
        self, local: Address, src: Address, data: bytes, now: float, unix_now: float
    ) -> None:
        """One datagram received on our socket ``local``; never raises on bad input."""
        self._clock(now, unix_now)
        kind = classify(data, src, self._server_to_relay)
        if kind is DatagramKind.STUN_FROM_RELAY:
            allocation = self._allocations[self._server_to_relay[src]]
            try:
                allocation.handle_stun(parse_stun(data), data, src, local, now)
            except MalformedPacket:
                self.counters["malformed_stun_from_relay"] += 1
            self._drain_allocation(allocation, now)
            return
        if kind is DatagramKind.CHANNEL_DATA_FROM_RELAY:
            allocation = self._allocations[self._server_to_relay[src]]
            unwrapped = allocation.decapsulate(data, src, now)
            self._drain_allocation(allocation, now)
            if unwrapped is None:
                self.counters["channel_data_dropped"] += 1
                return
            peer, payload, relayed = unwrapped
            kind = classify(payload, peer, ())
            local, src, data = relayed, peer, payload
        elif self.relay_only and kind is not DatagramKind.GARBAGE:
            self.counters["direct_ignored_relay_only"] += 1
            return
        if kind is DatagramKind.STUN:
            self._handle_ice(data, src, local, now)
        elif kind is DatagramKind.WIREGUARD:
            self._handle_wireguard(data, src, now, unix_now)
        else:
            self.counters["garbage_datagram"] += 1

    def _handle_ice(self, data: bytes, src: Address, local: Address, now: float) -> None:
        try:
            message = parse_stun(data)
        except MalformedPacket:
            self.counters["malformed_stun"] += 1
            return
        for conn in list(self._connections.values()):
            if conn.agent.accepts(message, data):
                conn.agent.handle_stun(message, data, src, local, now)
                self._drain_agent(conn, now)
                return
        self.counters["stun_no_agent"] += 1

    def _handle_wireguard(self, data: bytes, src: Address, now: float, unix_now: float) -> None:
        conn = self._connection_for_wireguard(data, src)
        if conn is None:
            self.counters["wireguard_no_connection"] += 1
            return
        result = conn.tunnel.decapsulate(data, src, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send_wireguard(conn, result.datagram, now)
        elif isinstance(result, WriteToTunnel):
            self._from_tunnel(conn, result.packet, now, unix_now)
        self._drain_tunnel(conn, now, unix_now)

    def _connection_for_wireguard(self, data: bytes, src: Address) -> GatewayConnection | None:
        index = receiver_index(data) if message_type(data) in (2, 3, 4) else None
        for conn in self._connections.values():
            if index is not None and conn.tunnel.owns_index(index):
                return conn
        if index is None:
            for conn in self._connections.values():
                if conn.agent.accepts_from(src):
                    return conn
        return None

    def _from_tunnel(self, conn: GatewayConnection, packet: bytes, now: float,
                     unix_now: float) -> None:
        if p2p_control.is_p2p_control(packet):
            event = p2p_control.decode(packet)
            if isinstance(event, p2p_control.DomainStatus):
                self._on_domain_status(event)
            else:
                self.counters["p2p_control_ignored"] += 1
            return
        self._tun_out.append(packet)

    def _on_domain_status(self, status: p2p_control.DomainStatus) -> None:
        dns = self._dns.get(str(status.resource_id))
        if dns is None or dns.domain != status.domain.lower():
            self.counters["domain_status_unknown"] += 1
            return
        text = "Active" if status.active else "Inactive"
        dns.next_send = None
        if dns.status != text:
            dns.status = text
            self._events.append(DnsMapping(dns.resource_id, dns.domain, dns.proxy_ips, text))

    # ------------------------------------------------------------------ TUN

    def handle_tun_packet(self, packet: bytes, now: float, unix_now: float) -> None:
        """An IP packet read from the TUN: route it to the resource's connection."""
        self._clock(now, unix_now)
        if not packet or packet[0] >> 4 not in (4, 6):
            self.counters["tun_not_ip"] += 1
            return
        if packet[0] >> 4 == 4:
            dst = packet[16:20] if len(packet) >= 20 else b""
        else:
            dst = packet[24:40] if len(packet) >= 40 else b""
        rid = self._resource_for(dst)
        if rid is None:
            self.counters["tun_no_resource"] += 1
            return
        gateway_id = self._resource_gateway.get(rid)
        conn = self._connections.get(gateway_id) if gateway_id is not None else None
        if conn is None:
            self.counters["tun_no_connection"] += 1
            last = self._requested_at.get(rid)
            if self._initialized and (last is None or now - last >= FLOW_REQUEST_INTERVAL):
                self._request_flow(rid, now)
            return
        result = conn.tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send_wireguard(conn, result.datagram, now)
        self._drain_tunnel(conn, now, unix_now)

    def inject(self, resource: str, packet: bytes, now: float, unix_now: float) -> bool:
        """Encrypt ``packet`` as is over the connection serving ``resource`` (tests only)."""
        self._clock(now, unix_now)
        rid = self._resolve(resource)
        gateway_id = self._resource_gateway.get(rid) if rid is not None else None
        conn = self._connections.get(gateway_id) if gateway_id is not None else None
        if conn is None:
            return False
        result = conn.tunnel.encapsulate(packet, now, unix_now)
        if isinstance(result, WriteToNetwork):
            self._send_wireguard(conn, result.datagram, now)
        self._drain_tunnel(conn, now, unix_now)
        return True

    def _resource_for(self, dst: bytes) -> str | None:
        """The resource serving ``dst`` (longest prefix); cached, it runs per packet."""
        cache = self._route_cache
        if dst in cache:
            return cache[dst]
        if len(cache) >= 4096:
            cache.clear()
        rid = cache[dst] = self._lookup_resource(dst)
        return rid

    def _lookup_resource(self, dst: bytes) -> str | None:
        if not dst:
            return None
        rid = self._proxy_to_resource.get(dst)
        if rid is not None:
            return rid
        address = ipaddress.ip_address(dst)
        best: tuple[int, str] | None = None
        for resource in self._resources.values():
            for network in resource.networks():
                if (network.version == address.version and address in network
                        and (best is None or network.prefixlen > best[0])):
                    best = (network.prefixlen, resource.id)
        return None if best is None else best[1]

    # ------------------------------------------------------------------ timers

    def handle_timeout(self, now: float, unix_now: float) -> None:
        self._clock(now, unix_now)
        self._limiter.handle_timeout(now)
        for allocation in list(self._allocations.values()):
            allocation.handle_timeout(now)
            self._drain_allocation(allocation, now)
        for conn in list(self._connections.values()):
            if conn.path is None and now - conn.created_at >= CONNECT_TIMEOUT:
                self._drop_connection(conn, "connection timeout (no path)")
                continue
            conn.agent.handle_timeout(now)
            self._drain_agent(conn, now)
            if self._connections.get(conn.gateway_id) is not conn:
                continue
            conn.tunnel.handle_timeout(now, unix_now)
            self._drain_tunnel(conn, now, unix_now)
            if conn.ready:
                self._send_due_assignments(conn, now, unix_now)

    def poll_timeout(self) -> float | None:
        deadlines = [self._limiter.poll_timeout()]
        deadlines += [a.poll_timeout() for a in self._allocations.values()]
        for conn in self._connections.values():
            deadlines += [conn.agent.poll_timeout(), conn.tunnel.poll_timeout()]
            if conn.path is None:
                deadlines.append(conn.created_at + CONNECT_TIMEOUT)
            if conn.ready:
                deadlines += [self._dns[r].next_send for r in conn.resources if r in self._dns]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    # ------------------------------------------------------------------ output

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_tun(self) -> bytes | None:
        return self._tun_out.popleft() if self._tun_out else None

    def poll_portal(self) -> tuple[str, dict[str, Any]] | None:
        return self._portal_out.popleft() if self._portal_out else None

    def poll_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def connection(self, gateway_id: str) -> GatewayConnection | None:
        """For diagnostics and tests."""
        return self._connections.get(gateway_id)

    # ------------------------------------------------------------------ internals

    def _clock(self, now: float, unix_now: float) -> None:
        self._now = max(self._now, now)
        self._unix_delta = unix_now - now

    def _drain_agent(self, conn: GatewayConnection, now: float) -> None:
        agent = conn.agent
        while (tx := agent.poll_transmit()) is not None:
            self._send_from(tx, now)
        while (event := agent.poll_event()) is not None:
            if isinstance(event, Nominated):
                if self.relay_only and event.local.kind != "relay":
                    self.counters["non_relay_nomination_ignored"] += 1
                    continue
                conn.nominated = (event.local, event.remote)
                self._update_path(conn, now)
            elif isinstance(event, Disconnected):
                self._drop_connection(conn, f"ICE disconnected: {event.reason}")
                return

    def _update_path(self, conn: GatewayConnection, now: float) -> None:
        if conn.nominated is None or self._connections.get(conn.gateway_id) is not conn:
            return
        local, remote = conn.nominated
        path: Path
        if local.kind == "relay" and local.relay_id is not None:
            allocation = self._allocations.get(local.relay_id)
            if allocation is None:
                self._drop_connection(conn, f"nominated relay {local.relay_id} is gone")
                return
            if allocation.channel_for(remote, now) is None:
                allocation.bind_channel(remote, now)
                self._drain_allocation(allocation, now)
                return  # the path follows once the channel is bound
            path = RelayedPath(local.relay_id, remote)
        else:
            path = DirectPath(local.base or local.address, remote)
        if path == conn.path:
            return
        first = conn.path is None
        conn.path = path
        log.info("gateway %s reachable via %s path to %s", conn.gateway_id, path.name,
                 format_address(remote))
        if first:
            pending = list(conn.pending)
            conn.pending.clear()
            for datagram in pending:
                self._send_wireguard(conn, datagram, now)
            if not conn.tunnel.has_session and not conn.tunnel.handshake_in_flight:
                result = conn.tunnel.initiate(now, now + self._unix_delta)
                if isinstance(result, WriteToNetwork):
                    self._send_wireguard(conn, result.datagram, now)

    def _send_wireguard(self, conn: GatewayConnection, datagram: bytes, now: float) -> None:
        path = conn.path
        if path is None:
            conn.pending.append(datagram)
        elif isinstance(path, DirectPath):
            self._transmits.append(Transmit(path.local, path.remote, datagram))
        else:
            allocation = self._allocations.get(path.relay_id)
            wrapped = None if allocation is None else allocation.encapsulate(
                path.remote, datagram, now)
            if wrapped is None:
                self.counters["relay_send_failed"] += 1
                if allocation is not None:
                    allocation.bind_channel(path.remote, now)
                    self._drain_allocation(allocation, now)
            else:
                self._transmits.append(wrapped)

    def _send_from(self, tx: Transmit, now: float) -> None:
        """ICE transmits from a relayed address go out as ChannelData through that relay."""
        for allocation in self._allocations.values():
            if tx.src is not None and tx.src in allocation.relay_addresses():
                wrapped = allocation.encapsulate(tx.dst, tx.payload, now)
                if wrapped is None:
                    self.counters["ice_no_channel"] += 1
                    allocation.bind_channel(tx.dst, now)
                    self._drain_allocation(allocation, now)
                else:
                    self._transmits.append(wrapped)
                return
        self._transmits.append(tx)

    def _drain_tunnel(self, conn: GatewayConnection, now: float, unix_now: float) -> None:
        tunnel = conn.tunnel
        while (datagram := tunnel.poll_transmit()) is not None:
            self._send_wireguard(conn, datagram, now)
        while (event := tunnel.poll_event()) is not None:
            if isinstance(event, HandshakeCompleted) and not conn.ready:
                conn.ready = True
                log.info("WireGuard session with gateway %s established", conn.gateway_id)
                for rid in sorted(conn.resources):
                    self._announce_resource(conn, rid, now)
                self._send_due_assignments(conn, now, unix_now)
            elif isinstance(event, ConnectionExpired):
                self._drop_connection(conn, f"WireGuard: {event.reason}")
                return

    def _announce_resource(self, conn: GatewayConnection, rid: str, now: float) -> None:
        path = conn.path.name if conn.path is not None else "unknown"
        self._events.append(Ready(rid, conn.gateway_id, path))
        dns = self._dns.get(rid)
        if dns is not None and dns.status is None:
            dns.next_send = now

    def _send_due_assignments(self, conn: GatewayConnection, now: float,
                              unix_now: float) -> None:
        for rid in sorted(conn.resources):
            dns = self._dns.get(rid)
            if dns is None or dns.next_send is None or dns.next_send > now:
                continue
            dns.next_send = now + ASSIGNED_IPS_RETRY
            packet = p2p_control.encode_assigned_ips(uuid.UUID(rid), dns.domain, dns.proxy_ips)
            result = conn.tunnel.encapsulate(packet, now, unix_now)
            if isinstance(result, WriteToNetwork):
                self._send_wireguard(conn, result.datagram, now)
        self._drain_tunnel(conn, now, unix_now)

    def _drain_allocation(self, allocation: Allocation, now: float) -> None:
        while (tx := allocation.poll_transmit()) is not None:
            self._transmits.append(tx)
        while (event := allocation.poll_event()) is not None:
            self._on_allocation_event(allocation, event, now)
        for conn in list(self._connections.values()):
            if (conn.path is None and conn.nominated is not None
                    and conn.nominated[0].relay_id == allocation.relay_id):
                self._update_path(conn, now)

    def _on_allocation_event(self, allocation: Allocation, event: object, now: float) -> None:
        relay_id = allocation.relay_id
        if isinstance(event, CandidateAdded):
            if event.kind == "srflx":
                if self.relay_only:
                    return
                base = event.base or event.address
                log.info("server-reflexive candidate %s via relay %s",
                         format_address(event.address), relay_id)
                for conn in self._connections.values():
                    if conn.path is None:
                        self._signal(conn, [Candidate.srflx(event.address, base)])
                return
            candidate = Candidate.relay(event.address, relay_id)
            log.info("relayed candidate %s on relay %s", format_address(event.address), relay_id)
            for conn in list(self._connections.values()):
                if conn.path is None:
                    conn.agent.add_local_candidate(candidate, now)
                    self._signal(conn, [candidate])
                    self._drain_agent(conn, now)
        elif isinstance(event, CandidateRemoved) and event.kind == "relay":
            candidate = Candidate.relay(event.address, relay_id)
            for conn in list(self._connections.values()):
                conn.agent.invalidate_local_candidate(event.address, now)
                self._signal(conn, [candidate], invalidate=True)
                if isinstance(conn.path, RelayedPath) and conn.path.relay_id == relay_id:
                    self._drop_connection(conn, f"relay candidate on {relay_id} invalidated")
        elif isinstance(event, AllocationFailed):
            log.warning("allocation on relay %s failed: %s", relay_id, event.reason)
