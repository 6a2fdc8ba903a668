"""What one client can make the gateway hold or do for its DNS resources is bounded and
counted (ClientOnGateway), and the rest of its state is unaffected when a bound is hit."""

from __future__ import annotations

import ipaddress
import logging
import uuid

import pytest

from gateway import peer as peer_module
from gateway.packet import ip
from gateway.packet.p2p_control import DomainStatus, decode, encode_assigned_ips
from gateway.peer import (
    MAX_DNS_TRANSLATIONS,
    MAX_RESOLUTIONS_IN_FLIGHT,
    ClientOnGateway,
    Drop,
    NeedsResolution,
)
from gateway.resources import CidrResource, DnsResource, PortRangeFilter
from tests.support.clock import ManualClock

CLIENT4 = ipaddress.IPv4Address("100.64.0.7")
CLIENT6 = ipaddress.IPv6Address("fd00:2021:1111::7")
REAL4 = ipaddress.ip_address("93.184.216.34")
UDP7000 = PortRangeFilter("udp", 7000, 7000)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def make(clock: ManualClock, **limits: object) -> ClientOnGateway:
    return ClientOnGateway(client_id=uuid.uuid4(), ipv4=CLIENT4, ipv6=CLIENT6,
                           now=clock.monotonic(), **limits)  # type: ignore[arg-type]


def proxies(domain_index: int) -> list[IPAddress]:
    """The 4 + 4 proxy IPs a client would assign to its ``domain_index``-th domain."""
    base4 = int(ipaddress.IPv4Address("100.96.0.0")) + 4 * domain_index
    base6 = int(ipaddress.IPv6Address("fd00:2021:1111:8000::")) + 4 * domain_index
    return [ipaddress.IPv4Address(base4 + i) for i in range(4)] + [
        ipaddress.IPv6Address(base6 + i) for i in range(4)
    ]


def assign(peer: ClientOnGateway, resource: DnsResource, domain: str,
           proxy_ips: list[IPAddress], resolved: list[IPAddress], now: float = 0.0) -> bool:
    """AssignedIps, then its resolution; True if the gateway answered Active."""
    result = peer.handle_inbound(encode_assigned_ips(resource.id, domain, proxy_ips), now)
    assert isinstance(result, NeedsResolution), result
    status = peer.handle_resolved(resource.id, domain, result.proxy_ips, resolved, now,
                                  reply=True)
    assert status is not None
    decoded = decode(status)
    assert isinstance(decoded, DomainStatus)
    return decoded.active


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_proxy_ips_outside_the_proxy_ranges_are_ignored(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A "proxy IP" that is a CIDR resource's host would replace that host's filters with
    the DNS resource's (and NAT it elsewhere): only the proxy ranges are accepted."""
    peer = make(clock)
    host = CidrResource(uuid.uuid4(), ipaddress.ip_network("10.0.0.5/32"), "host", (UDP7000,))
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", ())
    peer.add_resource(host, None, 0.0)
    peer.add_resource(corp, None, 0.0)
    inside = proxies(0)[0]
    caplog.set_level(logging.WARNING, logger="gateway.peer")
    for _ in range(2):
        assert assign(peer, corp, "a.corp.test", [ipaddress.ip_address("10.0.0.5"), inside],
                      [REAL4])
    assert set(peer.translations()) == {inside}
    assert peer.counters["proxy_ip_out_of_range"] == 2
    assert len([r for r in caplog.records if "outside the DNS proxy ranges" in r.message]) == 1
    # the host keeps its own filter and is not translated
    assert peer.handle_inbound(ip.build_tcp_syn(CLIENT4, "10.0.0.5", 1, 80), 0.0) == Drop(
        "not_allowed")
    allowed = peer.handle_inbound(ip.build_udp(CLIENT4, "10.0.0.5", 1, 7000, b"x"), 0.0)
    assert isinstance(allowed, bytes) and ip.destination(allowed) == bytes([10, 0, 0, 5])
    # nothing left in range: the set-up fails
    assert not assign(peer, corp, "b.corp.test", [ipaddress.ip_address("8.8.8.8")], [REAL4])


def test_translations_per_client_are_capped(clock: ManualClock) -> None:
    peer = make(clock)
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", ())
    peer.add_resource(corp, None, 0.0)
    domains = MAX_DNS_TRANSLATIONS // 8
    for index in range(domains):
        assert assign(peer, corp, f"d{index}.corp.test", proxies(index), [REAL4])
    assert len(peer.translations()) == MAX_DNS_TRANSLATIONS
    assert not assign(peer, corp, "one-more.corp.test", proxies(domains), [REAL4])
    assert peer.counters["dns_translations_limit"] == 1
    # an existing domain may still be re-assigned (it adds no translation)
    assert assign(peer, corp, "d0.corp.test", proxies(0), [ipaddress.ip_address("1.1.1.1")])
    assert len(peer.translations()) == MAX_DNS_TRANSLATIONS
    # and the client's traffic to its translations still flows
    out = peer.handle_inbound(ip.build_udp(CLIENT4, proxies(1)[0], 5, 53, b"q"), 0.0)
    assert isinstance(out, bytes) and ip.destination(out) == REAL4.packed


def test_domains_per_client_are_capped(clock: ManualClock) -> None:
    """The same proxy IPs re-assigned to new names add no translation but a stored
    resolution each: those are capped too."""
    peer = make(clock, max_domains=3)
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", ())
    peer.add_resource(corp, None, 0.0)
    for index in range(3):
        assert assign(peer, corp, f"d{index}.corp.test", proxies(0), [REAL4])
    assert not assign(peer, corp, "d3.corp.test", proxies(0), [REAL4])
    assert peer.counters["dns_domains_limit"] == 1
    assert assign(peer, corp, "d4.corp.test", proxies(0), [])  # empty: stores nothing


def test_resolutions_in_flight_per_client_are_capped(clock: ManualClock) -> None:
    peer = make(clock)
    other = make(clock)
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", ())
    peer.add_resource(corp, None, 0.0)
    other.add_resource(corp, None, 0.0)

    def ask(client: ClientOnGateway, index: int) -> object:
        packet = encode_assigned_ips(corp.id, f"d{index}.corp.test", proxies(index))
        return client.handle_inbound(packet, clock.monotonic())

    asked = [ask(peer, i) for i in range(MAX_RESOLUTIONS_IN_FLIGHT)]
    assert all(isinstance(result, NeedsResolution) for result in asked)
    assert ask(peer, 999) == Drop("dns_resolutions_limit")
    assert ask(peer, 998) == Drop("dns_resolutions_limit")
    assert peer.counters["dns_resolutions_limit"] == 2
    assert isinstance(ask(other, 0), NeedsResolution)  # another client is not affected
    # an answer frees a slot
    first = asked[0]
    assert isinstance(first, NeedsResolution)
    peer.handle_resolved(corp.id, first.domain, first.proxy_ips, [REAL4], clock.monotonic(),
                         reply=True)
    assert isinstance(ask(peer, 997), NeedsResolution)
    assert ask(peer, 996) == Drop("dns_resolutions_limit")
    # answers that never come back stop counting after the lookup timeout
    clock.tick(11.0)
    assert isinstance(ask(peer, 995), NeedsResolution)


def test_assigned_ips_updates_the_filter_table_in_place(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new domain's proxy IPs are inserted, not the whole table rebuilt (a rebuild
    walks every translation: 80 ms at 12,000, under the lock the shared threads need)."""
    peer = make(clock)
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", (UDP7000,))
    host = CidrResource(uuid.uuid4(), ipaddress.ip_network("1.1.1.1/32"), "host",
                        (PortRangeFilter("tcp", 22, 22),))
    peer.add_resource(corp, None, 0.0)
    peer.add_resource(host, None, 0.0)
    for index in range(20):
        assert assign(peer, corp, f"d{index}.corp.test", proxies(index), [REAL4])
    rebuilds = 0
    real_build = peer_module.build_filter_table

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal rebuilds
        rebuilds += 1
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(peer_module, "build_filter_table", counting)
    assert assign(peer, corp, "new.corp.test", proxies(100), [REAL4])
    assert assign(peer, corp, "d3.corp.test", proxies(3), [ipaddress.ip_address("8.8.4.4")])
    assert rebuilds == 0
    incremental = sorted(map(str, peer.filter_table()))
    # a resolution that is a /32 CIDR resource's host changes that entry: full rebuild
    assert assign(peer, corp, "host.corp.test", proxies(101), [ipaddress.ip_address("1.1.1.1")])
    assert rebuilds == 1
    engine = dict(peer.filter_table())[ipaddress.ip_network("1.1.1.1/32")]
    assert engine.allows(2, 7000) and engine.allows(1, 22)  # both resources' filters
    # the in-place table equals a full rebuild
    fresh = make(clock)
    fresh.add_resource(corp, None, 0.0)
    fresh.add_resource(host, None, 0.0)
    for index in range(20):
        assign(fresh, corp, f"d{index}.corp.test", proxies(index), [REAL4])
    assign(fresh, corp, "new.corp.test", proxies(100), [REAL4])
    assign(fresh, corp, "d3.corp.test", proxies(3), [ipaddress.ip_address("8.8.4.4")])
    fresh._rebuild_filters()
    assert incremental == sorted(map(str, fresh.filter_table()))


def test_nat_exhaustion_and_session_cap_drop_and_count(clock: ManualClock) -> None:
    peer = make(clock, nat_ports=(40000, 40003), max_nat_sessions=6)
    corp = DnsResource(uuid.uuid4(), "**.corp.test", "corp", ())
    peer.add_resource(corp, None, 0.0)
    assert assign(peer, corp, "a.corp.test", proxies(0), [REAL4])
    proxy = proxies(0)[0]
    for port in range(1000, 1004):
        out = peer.handle_inbound(ip.build_udp(CLIENT4, proxy, port, 53, b"q"), 0.0)
        assert isinstance(out, bytes)
    assert peer.handle_inbound(ip.build_udp(CLIENT4, proxy, 1004, 53, b"q"), 0.0) == Drop(
        "nat_exhausted")
    assert peer.counters["nat_exhausted"] == 1
    # TCP has its own port space; the table's session cap comes next
    for port in (1, 2):
        syn = ip.build_tcp_syn(CLIENT4, proxy, port, 80)
        assert isinstance(peer.handle_inbound(syn, 0.0), bytes)
    syn = ip.build_tcp_syn(CLIENT4, proxy, 3, 80)
    assert peer.handle_inbound(syn, 0.0) == Drop("nat_sessions_limit")
    assert peer.counters["nat_sessions_limit"] == 1
    # established flows go on
    assert isinstance(peer.handle_inbound(ip.build_udp(CLIENT4, proxy, 1000, 53, b"q"), 0.0),
                      bytes)
