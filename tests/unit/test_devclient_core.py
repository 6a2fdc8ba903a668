"""ClientCore without IO: portal frames in, pushes/events/datagrams out, a manual clock.

The paired tests run the client core against :class:`FakeGateway` (a controlled ICE agent
and a responder tunnel) over an in-memory link, so every step is deterministic.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from devclient.core import (
    ASSIGNED_IPS_RETRY,
    ClientCore,
    DnsMapping,
    Failed,
    FlowCreated,
    InterfaceConfig,
    ProxyIpPool,
    Ready,
    parse_address,
)
from gateway.ice.candidate import Candidate, IceCredentials
from gateway.packet.ip import build_udp
from gateway.wg.keys import decode_key, encode_key
from tests.support.clock import ManualClock
from tests.support.fake_gateway import FakeGateway, udp_echo

CIDR_ID = "11111111-1111-4111-8111-111111111111"
DNS_ID = "22222222-2222-4222-8222-222222222222"
OTHER_ID = "44444444-4444-4444-8444-444444444444"
CLIENT_LOCAL = ("10.0.0.2", 40000)
GATEWAY_LOCAL = ("10.0.0.3", 50000)
CLIENT_CREDS = IceCredentials("cccc", "c" * 22)
GATEWAY_CREDS = IceCredentials("gggg", "g" * 22)


def init_payload(relays: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "interface": {"ipv4": "100.64.0.9", "ipv6": "fd00:2021:1111::9"},
        "resources": [
            {"id": CIDR_ID, "type": "cidr", "address": "10.99.0.0/24", "name": "net",
             "filters": []},
            {"id": OTHER_ID, "type": "cidr", "address": "10.99.0.128/25", "name": "half",
             "filters": []},
            {"id": DNS_ID, "type": "dns", "address": "app.example", "name": "app",
             "filters": []},
        ],
        "relays": relays or [],
    }


def drain(core: ClientCore) -> tuple[list[tuple[str, dict[str, Any]]], list[object]]:
    pushes: list[tuple[str, dict[str, Any]]] = []
    events: list[object] = []
    while (push := core.poll_portal()) is not None:
        pushes.append(push)
    while (event := core.poll_event()) is not None:
        events.append(event)
    return pushes, events


class World:
    """A client core and a fake gateway joined by an in-memory link and a stub portal."""

    def __init__(self, clock: ManualClock, *, relay_only: bool = False) -> None:
        self.clock = clock
        self.rng = random.Random(1)
        self.core = ClientCore(rng=self.rng, now=clock.monotonic(), unix_now=clock.unix(),
                               relay_only=relay_only)
        self.core.set_local_address(CLIENT_LOCAL)
        self.gateway = FakeGateway(random.Random(2), GATEWAY_LOCAL, clock.monotonic())
        self.events: list[object] = []
        self.pushes: list[tuple[str, dict[str, Any]]] = []
        self.tun: list[bytes] = []
        self.psk = bytes(range(32))
        self.drop_assigned = 0

    def flow_created(self, resource_id: str) -> dict[str, Any]:
        return {
            "resource_id": resource_id, "gateway_id": self.gateway.id,
            "gateway_public_key": self.gateway.public_key, "gateway_ipv4": "100.64.0.2",
            "gateway_ipv6": "fd00:2021:1111::2",
            "client_ice_credentials": {"username": CLIENT_CREDS.ufrag,
                                       "password": CLIENT_CREDS.pwd},
            "gateway_ice_credentials": {"username": GATEWAY_CREDS.ufrag,
                                        "password": GATEWAY_CREDS.pwd},
            "preshared_key": encode_key(self.psk),
        }

    def portal(self, event: str, payload: Any) -> None:
        self.core.handle_portal_message(event, payload, self.clock.monotonic(), self.clock.unix())

    def step(self) -> None:
        """Deliver everything in flight, then run timers that are due."""
        now, unix = self.clock.monotonic(), self.clock.unix()
        moved = True
        while moved:
            moved = False
            while (push := self.core.poll_portal()) is not None:
                moved = True
                self.pushes.append(push)
                self._portal_push(*push)
            while (tx := self.core.poll_transmit()) is not None:
                moved = True
                if tx.dst == GATEWAY_LOCAL:
                    if self.drop_assigned and len(tx.payload) > 148:
                        before = len(self.gateway.assigned)
                        self.gateway.handle_datagram(CLIENT_LOCAL, tx.payload, now, unix)
                        if len(self.gateway.assigned) > before:
                            self.drop_assigned -= 1
                            self.gateway.assigned.pop()
                            self.gateway.transmits.clear()  # the DomainStatus is "lost"
                        continue
                    self.gateway.handle_datagram(CLIENT_LOCAL, tx.payload, now, unix)
            while self.gateway.transmits:
                moved = True
                tx = self.gateway.transmits.popleft()
                if tx.dst == CLIENT_LOCAL:
                    self.core.handle_datagram(CLIENT_LOCAL, GATEWAY_LOCAL, tx.payload, now, unix)
            while (packet := self.core.poll_tun()) is not None:
                self.tun.append(packet)
            while (event := self.core.poll_event()) is not None:
                self.events.append(event)
        for deadline, handle in ((self.core.poll_timeout(), self.core.handle_timeout),
                                 (self.gateway.poll_timeout(), self.gateway.handle_timeout)):
            if deadline is not None and deadline <= now:
                handle(now, unix)

    def _portal_push(self, event: str, payload: dict[str, Any]) -> None:
        now = self.clock.monotonic()
        if event == "create_flow":
            lines = self.gateway.authorize(decode_key(self.core.public_key), self.psk,
                                           CLIENT_CREDS, GATEWAY_CREDS, now)
            self.portal("flow_created", self.flow_created(payload["resource_id"]))
            self.portal("ice_candidates", {"gateway_id": self.gateway.id, "candidates": lines})
        elif event == "broadcast_ice_candidates":
            self.gateway.add_remote_candidates(payload["candidates"], now)

    def run(self, seconds: float, tick: float = 0.05) -> None:
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.step()
            self.clock.tick(tick)
        self.step()

    def ready(self) -> list[Ready]:
        return [e for e in self.events if isinstance(e, Ready)]


# ---------------------------------------------------------------------- small pieces


def test_proxy_ip_pool_assigns_four_plus_four_stable_per_domain() -> None:
    pool = ProxyIpPool()
    first = pool.assign("App.Example.")
    assert pool.assign("app.example") == first
    second = pool.assign("other.example")
    assert not set(first) & set(second)
    for ips in (first, second):
        parsed = [ipaddress.ip_address(ip) for ip in ips]
        assert [ip.version for ip in parsed] == [4, 4, 4, 4, 6, 6, 6, 6]
        assert all(ip in ipaddress.ip_network("100.96.0.0/11") for ip in parsed[:4])
        assert all(ip in ipaddress.ip_network("fd00:2021:1111:8000::/107") for ip in parsed[4:])


def test_parse_address_both_families() -> None:
    assert parse_address("192.0.2.1:3478") == ("192.0.2.1", 3478)
    assert parse_address("[2001:db8::1]:3478") == ("2001:db8::1", 3478)
    with pytest.raises(ValueError):
        parse_address("192.0.2.1")


def test_flow_created_parse_decodes_keys_and_rejects_bad_ones(clock: ManualClock) -> None:
    world = World(clock)
    payload = world.flow_created(CIDR_ID)
    flow = FlowCreated.parse(payload)
    assert flow.preshared_key == world.psk and flow.gateway_id == world.gateway.id
    assert flow.client_credentials == CLIENT_CREDS
    assert flow.gateway_credentials == GATEWAY_CREDS
    with pytest.raises(ValueError):
        FlowCreated.parse({**payload, "preshared_key": "c2hvcnQ="})
    with pytest.raises(KeyError):
        FlowCreated.parse({k: v for k, v in payload.items() if k != "gateway_ice_credentials"})


def test_init_configures_interface_and_requests_by_name(clock: ManualClock) -> None:
    core = ClientCore(rng=random.Random(3), now=clock.monotonic(), unix_now=clock.unix())
    core.request("net", clock.monotonic())
    core.request("missing", clock.monotonic())
    assert drain(core) == ([], [])  # nothing before init
    core.handle_portal_message("init", init_payload(), clock.monotonic(), clock.unix())
    pushes, events = drain(core)
    assert pushes == [("create_flow", {"resource_id": CIDR_ID})]
    config = events[0]
    assert isinstance(config, InterfaceConfig)
    assert config.routes == ("100.96.0.0/11", "fd00:2021:1111:8000::/107", "10.99.0.0/24",
                             "10.99.0.128/25")
    assert events[1:] == [Failed("missing", "unknown_resource")]
    # A second init with the same interface does not reconfigure it.
    core.handle_portal_message("init", init_payload(), clock.monotonic(), clock.unix())
    assert not [e for e in drain(core)[1] if isinstance(e, InterfaceConfig)]


def test_malformed_portal_payloads_are_dropped(clock: ManualClock) -> None:
    core = ClientCore(rng=random.Random(3), now=clock.monotonic(), unix_now=clock.unix())
    core.handle_portal_message("flow_created", {"resource_id": CIDR_ID}, clock.monotonic(),
                               clock.unix())
    core.handle_portal_message("init", {"resources": []}, clock.monotonic(), clock.unix())
    assert core.counters["portal_message_malformed"] == 2
    core.handle_portal_message("flow_creation_failed", {"resource_id": CIDR_ID,
                                                         "reason": "offline"},
                               clock.monotonic(), clock.unix())
    assert drain(core)[1] == [Failed(CIDR_ID, "offline")]


def test_relays_are_allocated_and_other_family_skipped(clock: ManualClock) -> None:
    core = ClientCore(rng=random.Random(3), now=clock.monotonic(), unix_now=clock.unix())
    core.set_local_address(CLIENT_LOCAL)
    relays = [
        {"id": "r1", "type": "turn", "addr": "10.0.0.9:3478", "username": "u", "password": "p"},
        {"id": "r1", "type": "turn", "addr": "[2001:db8::9]:3478", "username": "u",
         "password": "p"},
    ]
    core.handle_portal_message("init", init_payload(relays), clock.monotonic(), clock.unix())
    destinations = set()
    while (tx := core.poll_transmit()) is not None:
        destinations.add(tx.dst)
    assert destinations == {("10.0.0.9", 3478)}  # STUN binding to the IPv4 server only


def test_flow_created_signals_host_candidate_and_uses_early_candidates(
    clock: ManualClock,
) -> None:
    world = World(clock)
    world.portal("init", init_payload())
    drain(world.core)
    early = Candidate.host(GATEWAY_LOCAL).to_sdp()
    world.portal("ice_candidates", {"gateway_id": world.gateway.id, "candidates": [early]})
    world.portal("flow_created", world.flow_created(CIDR_ID))
    pushes, _ = drain(world.core)
    assert pushes == [("broadcast_ice_candidates", {
        "gateway_ids": [world.gateway.id],
        "candidates": [Candidate.host(CLIENT_LOCAL).to_sdp()],
    })]
    conn = world.core.connection(world.gateway.id)
    assert conn is not None
    assert [c.address for c in conn.agent.remote_candidates] == [GATEWAY_LOCAL]


def test_relay_only_signals_no_host_candidate(clock: ManualClock) -> None:
    world = World(clock, relay_only=True)
    world.portal("init", init_payload())
    world.portal("flow_created", world.flow_created(CIDR_ID))
    pushes, _ = drain(world.core)
    assert pushes == []  # no relays yet, and host candidates are never signalled
    conn = world.core.connection(world.gateway.id)
    assert conn is not None and conn.agent.local_candidates == []


# ---------------------------------------------------------------------- paired with a gateway


def test_connects_and_exchanges_packets(clock: ManualClock) -> None:
    world = World(clock)
    world.core.request("net", clock.monotonic())
    world.portal("init", init_payload())
    world.run(2.0)
    assert world.ready() == [Ready(CIDR_ID, world.gateway.id, "direct")]
    packet = build_udp("100.64.0.9", "10.99.0.20", 5000, 7, b"hello")
    world.core.handle_tun_packet(packet, clock.monotonic(), clock.unix())
    world.step()
    assert world.gateway.received[-1] == packet
    assert world.tun == [udp_echo(packet)]


def test_traffic_requests_flows_at_most_every_two_seconds(clock: ManualClock) -> None:
    world = World(clock)
    world.portal("init", init_payload())
    drain(world.core)
    packet = build_udp("100.64.0.9", "10.99.0.200", 5000, 7, b"x")  # /25 beats /24
    for _ in range(3):
        world.core.handle_tun_packet(packet, clock.monotonic(), clock.unix())
    assert drain(world.core)[0] == [("create_flow", {"resource_id": OTHER_ID})]
    clock.tick(2.0)
    world.core.handle_tun_packet(packet, clock.monotonic(), clock.unix())
    assert drain(world.core)[0] == [("create_flow", {"resource_id": OTHER_ID})]


def test_second_resource_on_same_gateway_reuses_connection(clock: ManualClock) -> None:
    world = World(clock)
    world.core.request("net", clock.monotonic())
    world.portal("init", init_payload())
    world.run(2.0)
    conn = world.core.connection(world.gateway.id)
    world.core.request("half", clock.monotonic())
    world.run(0.5)
    assert world.core.connection(world.gateway.id) is conn
    assert [r.resource for r in world.ready()] == [CIDR_ID, OTHER_ID]


def test_new_gateway_key_replaces_connection_and_rerequests(clock: ManualClock) -> None:
    world = World(clock)
    world.core.request("net", clock.monotonic())
    world.core.request("half", clock.monotonic())
    world.portal("init", init_payload())
    world.run(2.0)
    old = world.core.connection(world.gateway.id)
    world.gateway.reset()
    world.pushes.clear()
    world.core.request("net", clock.monotonic())
    world.run(2.0)
    new = world.core.connection(world.gateway.id)
    assert new is not None and new is not old and new.public_key == world.gateway.static.public
    assert ("create_flow", {"resource_id": OTHER_ID}) in world.pushes  # forgotten by the reset
    assert new.resources == {CIDR_ID, OTHER_ID}
    packet = build_udp("100.64.0.9", "10.99.0.20", 5000, 7, b"after reset")
    world.core.handle_tun_packet(packet, clock.monotonic(), clock.unix())
    world.step()
    assert world.gateway.received[-1] == packet


def test_assigned_ips_retransmitted_until_domain_status(clock: ManualClock) -> None:
    world = World(clock)
    world.drop_assigned = 2
    world.core.request("app", clock.monotonic())
    world.portal("init", init_payload())
    world.run(1.0)
    assert world.ready() and not [e for e in world.events if isinstance(e, DnsMapping)]
    world.run(2 * ASSIGNED_IPS_RETRY + 0.2)
    mappings = [e for e in world.events if isinstance(e, DnsMapping)]
    assert len(mappings) == 1 and mappings[0].status == "Active"
    assert mappings[0].domain == "app.example" and len(mappings[0].proxy_ips) == 8
    assert len(world.gateway.assigned) == 1
    world.run(3 * ASSIGNED_IPS_RETRY)
    assert len(world.gateway.assigned) == 1  # answered: no more retransmissions
    proxy = mappings[0].proxy_ips[0]
    packet = build_udp("100.64.0.9", proxy, 5000, 53, b"q")
    world.core.handle_tun_packet(packet, clock.monotonic(), clock.unix())
    world.step()
    assert world.gateway.received[-1] == packet
