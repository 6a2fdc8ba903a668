"""Filter engine, prefix table and filter-table construction (rust/connlib/tunnel/src/peer.rs)."""

from __future__ import annotations

import ipaddress
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet.filter import (
    KIND_ICMP,
    KIND_OTHER,
    KIND_TCP,
    KIND_UDP,
    PERMIT_ALL,
    FilterEngine,
    PrefixTable,
    build_filter_table,
    resource_networks,
)
from gateway.resources import (
    CidrResource,
    DnsResource,
    IcmpFilter,
    InternetResource,
    PortRangeFilter,
)

TCP80 = PortRangeFilter("tcp", 80, 80)
TCP_8000_8100 = PortRangeFilter("tcp", 8000, 8100)
UDP53 = PortRangeFilter("udp", 53, 53)


def cidr(net: str, *filters: object) -> CidrResource:
    return CidrResource(uuid.uuid4(), ipaddress.ip_network(net), net, tuple(filters))  # type: ignore[arg-type]


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_port_ranges_are_inclusive() -> None:
    engine = FilterEngine.from_filter_lists([(TCP80, TCP_8000_8100, UDP53)])
    assert engine.allows(KIND_TCP, 80)
    assert not engine.allows(KIND_TCP, 79) and not engine.allows(KIND_TCP, 81)
    assert engine.allows(KIND_TCP, 8000) and engine.allows(KIND_TCP, 8100)
    assert not engine.allows(KIND_TCP, 7999) and not engine.allows(KIND_TCP, 8101)
    assert engine.allows(KIND_UDP, 53) and not engine.allows(KIND_UDP, 80)
    assert not engine.allows(KIND_TCP, 53)
    assert not engine.allows(KIND_ICMP, 0)
    assert not engine.allows(KIND_OTHER, 80)


def test_icmp_and_other_protocols() -> None:
    engine = FilterEngine.from_filter_lists([(IcmpFilter(),)])
    assert engine.allows(KIND_ICMP, 0)
    assert not engine.allows(KIND_TCP, 80) and not engine.allows(KIND_OTHER, 0)


def test_empty_list_permits_all_and_wins_the_union() -> None:
    assert FilterEngine.from_filter_lists([()]) is PERMIT_ALL
    assert FilterEngine.from_filter_lists([(TCP80,), ()]) is PERMIT_ALL
    assert PERMIT_ALL.allows(KIND_OTHER, 0)


def test_default_ranges_cover_all_ports() -> None:
    engine = FilterEngine.from_filter_lists([(PortRangeFilter("udp"),)])
    assert engine.allows(KIND_UDP, 0) and engine.allows(KIND_UDP, 65535)


@settings(max_examples=100, deadline=None)
@given(
    ranges=st.lists(
        st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda t: (min(t), max(t))),
        max_size=6,
    ),
    port=st.integers(0, 65535),
)
def test_allows_matches_naive_check(ranges: list[tuple[int, int]], port: int) -> None:
    filters = tuple(PortRangeFilter("tcp", s, e) for s, e in ranges)
    engine = FilterEngine.from_filter_lists([filters]) if filters else FilterEngine()
    assert engine.allows(KIND_TCP, port) == any(s <= port <= e for s, e in ranges)


def test_prefix_table_longest_match_and_cache_invalidation() -> None:
    table: PrefixTable[str] = PrefixTable()
    table.insert(ipaddress.ip_network("10.0.0.0/8"), "eight")
    table.insert(ipaddress.ip_network("10.1.0.0/16"), "sixteen")
    table.insert(ipaddress.ip_network("2001:db8::/32"), "v6")
    assert table.lookup(packed("10.1.2.3")) == "sixteen"
    assert table.lookup(packed("10.2.2.3")) == "eight"
    assert table.lookup(packed("11.0.0.1")) is None
    assert table.lookup(packed("2001:db8::1")) == "v6"
    assert table.lookup(packed("2001:db9::1")) is None
    table.insert(ipaddress.ip_network("10.2.2.3/32"), "host")  # must invalidate the cache
    assert table.lookup(packed("10.2.2.3")) == "host"
    table.insert(ipaddress.ip_network("0.0.0.0/0"), "default")
    assert table.lookup(packed("11.0.0.1")) == "default"
    assert table.lookup(packed("::1")) is None
    assert len(table) == 5
    assert (ipaddress.ip_network("10.1.0.0/16"), "sixteen") in table.items()


def test_cidr_superset_contributes_filters() -> None:
    wide = cidr("10.0.0.0/8", TCP80)
    narrow = cidr("10.1.0.0/16", UDP53)
    other = cidr("192.168.0.0/24", IcmpFilter())
    authorized = [(r, resource_networks(r)) for r in (wide, narrow, other)]
    table = build_filter_table(authorized, [])
    engine_narrow = table.lookup(packed("10.1.0.1"))
    assert engine_narrow is not None
    assert engine_narrow.allows(KIND_TCP, 80) and engine_narrow.allows(KIND_UDP, 53)
    assert not engine_narrow.allows(KIND_ICMP, 0)
    engine_wide = table.lookup(packed("10.2.0.1"))
    assert engine_wide is not None
    assert engine_wide.allows(KIND_TCP, 80) and not engine_wide.allows(KIND_UDP, 53)
    assert table.lookup(packed("172.16.0.1")) is None


def test_superset_with_empty_filters_permits_all() -> None:
    wide = cidr("10.0.0.0/8")
    narrow = cidr("10.1.0.0/16", UDP53)
    table = build_filter_table([(r, resource_networks(r)) for r in (wide, narrow)], [])
    assert table.lookup(packed("10.1.0.1")) is PERMIT_ALL


def test_internet_resource_and_dns_resolved_ips_are_supersets() -> None:
    internet = InternetResource(uuid.uuid4())
    narrow = cidr("10.1.0.0/16", UDP53)
    table = build_filter_table(
        [(r, resource_networks(r)) for r in (internet, narrow)], []
    )
    assert table.lookup(packed("10.1.0.1")) is PERMIT_ALL  # internet has no filters
    dns = DnsResource(uuid.uuid4(), "*.corp", "corp", (TCP80,))
    host = cidr("10.9.9.9/32", UDP53)
    resolved = [ipaddress.ip_address("10.9.9.9")]
    table = build_filter_table(
        [(dns, resource_networks(dns, resolved)), (host, resource_networks(host))], []
    )
    engine = table.lookup(packed("10.9.9.9"))
    assert engine is not None
    assert engine.allows(KIND_TCP, 80) and engine.allows(KIND_UDP, 53)
    # the DNS resource's own resolved IP is no table entry (only CIDR networks and proxy IPs)
    assert table.lookup(packed("10.9.9.8")) is None


def test_dns_proxy_ips_get_only_their_resource_filters() -> None:
    wide = cidr("100.96.0.0/11")  # would permit everything if it contributed
    proxy = packed("100.96.0.1")
    table = build_filter_table([(wide, resource_networks(wide))], [(proxy, (TCP80,))])
    engine = table.lookup(proxy)
    assert engine is not None and not engine.permit_all
    assert engine.allows(KIND_TCP, 80) and not engine.allows(KIND_UDP, 53)
    assert table.lookup(packed("100.96.0.2")) is PERMIT_ALL
    empty = build_filter_table([], [(proxy, ())])
    assert empty.lookup(proxy) is PERMIT_ALL
    assert empty.lookup(packed("100.96.0.2")) is None
