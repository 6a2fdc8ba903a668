"""The simulated world around the gateway: a portal, clients, relays and resources on one
manual clock and one in-memory network. Nothing here knows the gateway's internals: it
talks to :mod:`tests.sim.whole.gateway_under_test` only through that module's interface.

* The portal behaves like the real one where it matters (``devportal/server.py`` does the
  same with sockets): ``init`` on every join with TURN credentials rotated every time,
  ICE credentials derived from both public keys (``gateway/portal/derive.py``), a fresh
  PSK per flow, ``flow_authorized`` -> ``flow_created``, candidates forwarded both ways.
* Clients are the dev client's sans-IO core (``devclient/core.py``).
* Relays are :class:`tests.support.sim_turn.SimTurnServer`.
* A resource is a host that records what arrives and answers each packet.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devclient.core import ClientCore
from gateway.packet.ip import build_icmp_echo, build_tcp, build_udp
from gateway.portal.derive import (
    coturn_rest_credentials,
    derive_ice_credentials,
    generate_preshared_key,
)
from gateway.types import Address, format_address
from gateway.wg.keys import decode_key
from tests.sim.whole.gateway_under_test import GatewayUnderTest
from tests.support.clock import ManualClock
from tests.support.sim_turn import SimTurnServer

GATEWAY_ID = uuid.UUID("9b3f3a2e-0000-4000-8000-00000000a001")
GATEWAY_IP = "10.0.0.3"
#: One-way latency of every hop of the simulated network.
LATENCY = 0.002
PROTOS = ("udp", "tcp", "icmp")


@dataclass
class SimResource:
    id: uuid.UUID
    name: str
    index: int
    filters: list[dict[str, Any]]

    @property
    def cidr(self) -> str:
        return f"172.20.{self.index}.0/24"

    @property
    def host(self) -> str:
        return f"172.20.{self.index}.10"

    def to_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "type": "cidr", "address": self.cidr, "name": self.name,
                "filters": list(self.filters)}


@dataclass
class SimClient:
    name: str
    id: uuid.UUID
    core: ClientCore
    ipv4: str
    ipv6: str
    local: Address
    #: Tags of packets that reached this client's TUN.
    received: set[bytes] = field(default_factory=set)

    @property
    def public_key(self) -> str:
        return self.core.public_key


@dataclass
class SimRelay:
    id: uuid.UUID
    server: SimTurnServer
    secret: str


@dataclass(frozen=True)
class AuthorizeSent:
    """What the portal told the gateway (the reference model follows these)."""

    client_id: uuid.UUID
    resource_id: uuid.UUID
    expires_at: float | None
    gateway_key: str
    gateway_ice_username: str
    unix: float


class SimPortal:
    """The portal: one gateway, several clients; see the module docstring."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = random.Random(world.seed ^ 0x5EED)
        #: The gateway key as the portal knows it (from the last connect), and every one seen.
        self.gateway_key: str | None = None
        self.keys_seen: list[str] = []
        self.joins = 0
        self.resources: dict[uuid.UUID, SimResource] = {}
        self.forbidden: set[tuple[uuid.UUID, uuid.UUID]] = set()
        #: (client, resource) -> seconds a new authorization lasts (None: no expiry).
        self.lifetime: Callable[[uuid.UUID, uuid.UUID], float | None] = lambda c, r: None
        self.flows: dict[str, tuple[SimClient, uuid.UUID, dict[str, Any], dict[str, Any], str]] = {}
        self.authorized: list[AuthorizeSent] = []
        self.turn_usernames: list[str] = []
        #: Told of every ``authorize_flow`` as it is sent (the reference model follows).
        self.on_authorize: Callable[[AuthorizeSent], None] | None = None

    # ---- gateway side
    def gateway_connect(self, public_key: str) -> None:
        """A (re)join with ``public_key`` in the login URL: ``init`` with fresh relays."""
        self.gateway_key = public_key
        self.keys_seen.append(public_key)
        self.joins += 1
        self.world.to_gateway("init", {
            "interface": {"ipv4": "100.64.0.1", "ipv6": "fd00:2021:1111::1"},
            "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
            "relays": self.relay_entries(self.world.relays),
        })

    def relay_entries(self, relays: list[SimRelay]) -> list[dict[str, Any]]:
        entries = []
        for relay in relays:
            creds = coturn_rest_credentials(relay.secret, self.world.clock.unix(), self.rng)
            relay.server.add_account(creds.username, creds.password)
            self.turn_usernames.append(creds.username)
            entries.append({"id": str(relay.id), "type": "turn",
                            "addr": format_address(relay.server.address),
                            "username": creds.username, "password": creds.password,
                            "expires_at": creds.expires_at})
        return entries

    def from_gateway(self, event: str, payload: dict[str, Any]) -> None:
        if event == "flow_authorized":
            flow = self.flows.pop(payload["ref"], None)
            if flow is None:
                return
            client, rid, client_creds, gateway_creds, psk = flow
            assert self.gateway_key is not None
            self.world.to_client(client, "flow_created", {
                "resource_id": str(rid), "gateway_id": str(GATEWAY_ID),
                "gateway_public_key": self.gateway_key,
                "gateway_ipv4": "100.64.0.1", "gateway_ipv6": "fd00:2021:1111::1",
                "client_ice_credentials": client_creds,
                "gateway_ice_credentials": gateway_creds, "preshared_key": psk,
            })
        elif event in ("broadcast_ice_candidates", "broadcast_invalidated_ice_candidates"):
            forward = ("ice_candidates" if event == "broadcast_ice_candidates"
                       else "invalidate_ice_candidates")
            for client in self.world.clients:
                if str(client.id) in payload["client_ids"]:
                    self.world.to_client(client, forward, {
                        "gateway_id": str(GATEWAY_ID), "candidates": payload["candidates"]})

    # ---- client side
    def client_join(self, client: SimClient) -> None:
        self.world.to_client(client, "init", {
            "interface": {"ipv4": client.ipv4, "ipv6": client.ipv6},
            "resources": [r.to_json() for r in self.resources.values()],
            "relays": self.relay_entries(self.world.relays),
        })

    def from_client(self, client: SimClient, event: str, payload: dict[str, Any]) -> None:
        if event == "create_flow":
            rid = uuid.UUID(payload["resource_id"])
            if (client.id, rid) in self.forbidden or self.gateway_key is None:
                self.world.to_client(client, "flow_creation_failed",
                                     {"resource_id": str(rid), "reason": "forbidden"})
                return
            creds = derive_ice_credentials(client.id, client.public_key, GATEWAY_ID,
                                           self.gateway_key)
            psk = generate_preshared_key(self.rng)
            ref = f"sim.{self.rng.getrandbits(64):016x}"
            lifetime = self.lifetime(client.id, rid)
            expires_at = (None if lifetime is None
                          else int(self.world.clock.unix() + lifetime))
            self.flows[ref] = (client, rid, creds.client.to_json(), creds.gateway.to_json(), psk)
            sent = AuthorizeSent(client.id, rid, expires_at, self.gateway_key,
                                 creds.gateway.username, self.world.clock.unix())
            self.authorized.append(sent)
            if self.on_authorize is not None:
                self.on_authorize(sent)
            self.world.to_gateway("authorize_flow", {
                "ref": ref, "flow_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                "actor": {"id": str(client.id)},
                "resource": self.resources[rid].to_json(),
                "expires_at": expires_at,
                "client": {"id": str(client.id), "public_key": client.public_key,
                           "preshared_key": psk, "ipv4": client.ipv4, "ipv6": client.ipv6},
                "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(),
            })
        elif event in ("broadcast_ice_candidates", "broadcast_invalidated_ice_candidates"):
            forward = ("ice_candidates" if event == "broadcast_ice_candidates"
                       else "invalidate_ice_candidates")
            if str(GATEWAY_ID) in payload["gateway_ids"]:
                self.world.to_gateway(forward, {"client_id": str(client.id),
                                                "candidates": payload["candidates"]})

    # ---- administration
    def reject_access(self, client: SimClient, rid: uuid.UUID) -> None:
        self.world.to_gateway("reject_access",
                              {"client_id": str(client.id), "resource_id": str(rid)})

    def update_filters(self, rid: uuid.UUID, filters: list[dict[str, Any]]) -> None:
        self.resources[rid].filters = filters
        self.world.to_gateway("resource_updated", self.resources[rid].to_json())

    def relays_presence(self, removed: list[SimRelay], added: list[SimRelay]) -> None:
        """A relay leaving has gone down (its allocations with it); one joining is up."""
        for relay in removed:
            relay.server.restart()
        payload = {"disconnected_ids": [str(r.id) for r in removed],
                   "connected": self.relay_entries(added)}
        self.world.to_gateway("relays_presence", payload)
        for client in self.world.clients:
            self.world.to_client(client, "relays_presence", dict(payload))


class World:
    """Clock, network, portal, clients, relays, resources and the gateway under test."""

    def __init__(self, seed: int, *, clients: int = 2, resources: int = 3) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = ManualClock()
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = itertools.count()
        self._portal_queue: list[tuple[str, Any, str, dict[str, Any]]] = []
        self.relay_pool = [self._make_relay(i) for i in range(3)]
        self.relays: list[SimRelay] = [self.relay_pool[0]]
        self.portal = SimPortal(self)
        self.gateway = GatewayUnderTest(rng=random.Random(seed ^ 0x6A7E), host_ip=GATEWAY_IP,
                                        now=self.clock.monotonic(), unix=self.clock.unix())
        for i in range(resources):
            rid = uuid.UUID(int=0xA000 + i)
            self.portal.resources[rid] = SimResource(rid, f"res{i}", i + 1, [])
        #: (resource host ip) -> tags that arrived there
        self.arrived: dict[str, set[bytes]] = {
            r.host: set() for r in self.portal.resources.values()}
        self.clients: list[SimClient] = []
        for i in range(clients):
            core = ClientCore(rng=random.Random(seed * 31 + i), now=self.clock.monotonic(),
                              unix_now=self.clock.unix())
            local = (f"10.0.1.{i + 1}", 50000)
            core.set_local_address(local)
            client = SimClient(f"client{i}", uuid.UUID(int=0xC000 + i), core,
                               f"100.66.0.{i + 1}", f"fd00:2021:1111::6:{i + 1:x}", local)
            self.clients.append(client)
        self.gateway.start()
        self.pump()
        for client in self.clients:
            self.portal.client_join(client)
        self.pump()

    def _make_relay(self, i: int) -> SimRelay:
        address = (f"10.0.9.{i + 1}", 3478)
        server = SimTurnServer(address, "bootstrap", "unused", self._enqueue)
        return SimRelay(uuid.UUID(int=0xE000 + i), server, f"relay-secret-{i}")

    # ---------------------------------------------------------------- delivery

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def to_gateway(self, event: str, payload: dict[str, Any]) -> None:
        self._portal_queue.append(("gateway", None, event, payload))

    def to_client(self, client: SimClient, event: str, payload: dict[str, Any]) -> None:
        self._portal_queue.append(("client", client, event, payload))

    def _enqueue(self, src: Address, dst: Address, payload: bytes) -> None:
        heapq.heappush(self._queue, (self.now + LATENCY, next(self._seq), src, dst, payload))

    def _deliver(self, src: Address, dst: Address, payload: bytes) -> None:
        if dst in self.gateway.local_addresses:
            self.gateway.datagram_in(dst, src, payload)
            return
        for relay in self.relay_pool:
            server = relay.server
            if dst == server.address or dst in server.by_relayed:
                server.receive(src, dst, payload)
                return
        for client in self.clients:
            if dst == client.local:
                client.core.handle_datagram(dst, src, payload, self.now, self.clock.unix())
                return

    def pump(self) -> None:
        """Carry every output of everyone to where it goes (portal messages at once,
        datagrams onto the network queue, TUN packets to the resources and back)."""
        progress = True
        while progress:
            progress = False
            gw = self.gateway
            for key in gw.connect_requests():
                progress = True
                self.portal.gateway_connect(key)
            for event, payload in gw.portal_out():
                progress = True
                self.portal.from_gateway(event, payload)
            local = gw.local_addresses[0]
            for src, dst, datagram in gw.datagrams_out():
                progress = True
                self._enqueue(src or local, dst, datagram)
            for packet in gw.tun_out():
                progress = True
                self._resource_receive(packet)
            for client in self.clients:
                core = client.core
                while (msg := core.poll_portal()) is not None:
                    progress = True
                    self.portal.from_client(client, *msg)
                while (tx := core.poll_transmit()) is not None:
                    progress = True
                    self._enqueue(tx.src or client.local, tx.dst, tx.payload)
                while (received := core.poll_tun()) is not None:
                    client.received.add(_tag(received))
                while core.poll_event() is not None:
                    pass
            queue, self._portal_queue = self._portal_queue, []
            for kind, to, event, message in queue:
                progress = True
                if kind == "gateway":
                    self.gateway.portal_message(event, message)
                else:
                    to.core.handle_portal_message(event, message, self.now, self.clock.unix())

    def _resource_receive(self, packet: bytes) -> None:
        """A resource host got ``packet``: note its tag and answer it."""
        dst = ".".join(str(b) for b in packet[16:20]) if packet[0] >> 4 == 4 else None
        if dst is None or dst not in self.arrived:
            return
        tag = _tag(packet)
        self.arrived[dst].add(tag)
        if tag.startswith(b"req:"):
            self.gateway.tun_packet_in(build_reply(packet, b"rep:" + tag[4:]))

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance event by event for up to ``seconds``, or until ``until()`` holds."""
        end = self.now + seconds
        spins = 0
        while True:
            self.pump()
            if until is not None and until():
                return True
            deadlines = [self.gateway.poll_timeout()]
            deadlines += [c.core.poll_timeout() for c in self.clients]
            if self._queue:
                deadlines.append(self._queue[0][0])
            present = [d for d in deadlines if d is not None]
            next_at = min(present, default=math.inf)
            if next_at > end:
                self.clock.skip_to(end)
                self._timers()
                self.pump()
                return until is not None and until()
            spins = spins + 1 if next_at <= self.now else 0
            assert spins < 10_000, f"busy loop at {self.now}: a deadline that never moves"
            self.clock.skip_to(next_at)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, src, dst, payload = heapq.heappop(self._queue)
                self._deliver(src, dst, payload)
            self._timers()

    def _timers(self) -> None:
        now, unix = self.now, self.clock.unix()
        self.gateway.advance(now, unix)
        for client in self.clients:
            deadline = client.core.poll_timeout()
            if deadline is not None and deadline <= now:
                client.core.handle_timeout(now, unix)

    # ---------------------------------------------------------------- client view

    def client_up(self, client: SimClient) -> bool:
        """The client's connection to the gateway's CURRENT key is established."""
        conn = client.core.connection(str(GATEWAY_ID))
        return (conn is not None and conn.ready and conn.path is not None
                and conn.public_key == decode_key(self.gateway.public_key))


def _tag(packet: bytes) -> bytes:
    return packet[-12:]


def build_packet(src: str, dst: str, proto: str, port: int, tag: bytes) -> bytes:
    if proto == "udp":
        return build_udp(src, dst, 40000, port, tag)
    if proto == "tcp":
        return build_tcp(src, dst, 40000, port, payload=tag)
    return build_icmp_echo(src, dst, 7, 1, tag)


def build_reply(packet: bytes, tag: bytes) -> bytes:
    """The resource's answer: addresses and ports swapped, ``tag`` as payload."""
    src = ".".join(str(b) for b in packet[12:16])
    dst = ".".join(str(b) for b in packet[16:20])
    protocol = packet[9]
    if protocol == 17:
        dport = int.from_bytes(packet[22:24], "big")
        return build_udp(dst, src, dport, 40000, tag)
    if protocol == 6:
        dport = int.from_bytes(packet[22:24], "big")
        return build_tcp(dst, src, dport, 40000, payload=tag)
    return build_icmp_echo(dst, src, 7, 1, tag, reply=True)
