"""Filter engine and longest-prefix-match table (rust/connlib/tunnel/src/peer.rs).

``FilterEngine`` answers "may this client send this protocol/port here?";
``PrefixTable`` maps networks to values with a lookup that costs one dict probe per
distinct prefix length present, plus a per-address cache so a busy flow costs one probe.
``build_filter_table`` turns a client's authorizations into the table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from gateway.resources import (
    CidrResource,
    Filter,
    IcmpFilter,
    InternetResource,
    IpNetwork,
    PortRangeFilter,
    Resource,
)

#: Transport kinds a decision distinguishes.
KIND_OTHER = 0
KIND_TCP = 1
KIND_UDP = 2
KIND_ICMP = 3

_Ranges = tuple[tuple[int, int], ...]


def _merge(ranges: Iterable[tuple[int, int]]) -> _Ranges:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


class FilterEngine:
    """"Permit all", or an allow-list of TCP/UDP destination-port ranges and ICMP."""

    __slots__ = ("icmp", "permit_all", "tcp", "udp")

    def __init__(
        self, *, permit_all: bool = False, tcp: _Ranges = (), udp: _Ranges = (),
        icmp: bool = False,
    ) -> None:
        self.permit_all = permit_all
        self.tcp = _merge(tcp)
        self.udp = _merge(udp)
        self.icmp = icmp

    @classmethod
    def from_filter_lists(cls, filter_lists: Iterable[Sequence[Filter]]) -> FilterEngine:
        """Union of the lists; any empty list means "permit all"."""
        tcp: list[tuple[int, int]] = []
        udp: list[tuple[int, int]] = []
        icmp = False
        for filters in filter_lists:
            if not filters:
                return PERMIT_ALL
            for flt in filters:
                if isinstance(flt, IcmpFilter):
                    icmp = True
                elif isinstance(flt, PortRangeFilter):
                    (tcp if flt.protocol == "tcp" else udp).append((flt.start, flt.end))
        return cls(tcp=tuple(tcp), udp=tuple(udp), icmp=icmp)

    def allows(self, kind: int, port: int) -> bool:
        """Decision for a transport ``kind`` (KIND_*) and destination ``port``."""
        if self.permit_all:
            return True
        if kind == KIND_TCP:
            ranges = self.tcp
        elif kind == KIND_UDP:
            ranges = self.udp
        else:
            return kind == KIND_ICMP and self.icmp
        for start, end in ranges:
            if port < start:
                return False  # ranges are sorted and disjoint
            if port <= end:
                return True
        return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FilterEngine):
            return NotImplemented
        return (self.permit_all, self.tcp, self.udp, self.icmp) == (
            other.permit_all, other.tcp, other.udp, other.icmp
        )

    def __hash__(self) -> int:
        return hash((self.permit_all, self.tcp, self.udp, self.icmp))

    def __repr__(self) -> str:
        if self.permit_all:
            return "FilterEngine(permit_all=True)"
        return f"FilterEngine(tcp={self.tcp}, udp={self.udp}, icmp={self.icmp})"


PERMIT_ALL = FilterEngine(permit_all=True)

V = TypeVar("V")
_MISS = object()
_CACHE_LIMIT = 4096


class PrefixTable(Generic[V]):
    """Longest-prefix match over IPv4 and IPv6 networks, keyed by raw address bytes.

    Per family, one dict of masked integers per prefix length actually present, probed
    from the longest length down. Lookups are cached per address; any change clears the
    cache. Inserting the same network twice replaces the value.
    """

    def __init__(self) -> None:
        # width (4 or 16) -> {prefix length: {address >> host bits: value}}
        self._by_length: dict[int, dict[int, dict[int, V]]] = {4: {}, 16: {}}
        # width -> [(host bits, dict)] longest prefix first
        self._levels: dict[int, list[tuple[int, dict[int, V]]]] = {4: [], 16: []}
        self._cache: dict[bytes, object] = {}

    def insert(self, network: IpNetwork, value: V) -> None:
        width = 4 if network.version == 4 else 16
        bits = width * 8
        length = network.prefixlen
        tables = self._by_length[width]
        table = tables.get(length)
        if table is None:
            table = tables[length] = {}
            self._levels[width] = sorted(
                ((bits - n, t) for n, t in tables.items()), key=lambda level: level[0]
            )
        table[int(network.network_address) >> (bits - length)] = value
        self._cache.clear()

    def lookup(self, address: bytes) -> V | None:
        """The value of the longest network containing ``address`` (4 or 16 bytes)."""
        hit = self._cache.get(address, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        value: V | None = None
        number = int.from_bytes(address, "big")
        for host_bits, table in self._levels.get(len(address), ()):
            value = table.get(number >> host_bits)
            if value is not None:
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = value
        return value

    def items(self) -> list[tuple[IpNetwork, V]]:
        """All entries, for status output and tests."""
        out: list[tuple[IpNetwork, V]] = []
        for width, tables in self._by_length.items():
            bits = width * 8
            for length, table in tables.items():
                for key, value in table.items():
                    address = key << (bits - length)
                    network: IpNetwork
                    if width == 4:
                        network = ipaddress.IPv4Network((address, length))
                    else:
                        network = ipaddress.IPv6Network((address, length))
                    out.append((network, value))
        return out

    def __len__(self) -> int:
        return sum(len(t) for tables in self._by_length.values() for t in tables.values())


_INTERNET = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


def resource_networks(
    resource: Resource, resolved: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()
) -> tuple[IpNetwork, ...]:
    """The networks a resource "has" for superset checks."""
    if isinstance(resource, CidrResource):
        return (resource.address,)
    if isinstance(resource, InternetResource):
        return _INTERNET
    return tuple(ipaddress.ip_network(ip) for ip in resolved)


def build_filter_table(
    authorized: Sequence[tuple[Resource, Sequence[IpNetwork]]],
    proxy_ips: Iterable[tuple[bytes, Sequence[Filter]]],
) -> PrefixTable[FilterEngine]:
    """The filter table of one client.

    ``authorized``: every authorized resource with its networks (``resource_networks``).
    ``proxy_ips``: (raw proxy IP, filters of its still-authorized DNS resource). A proxy
    IP entry replaces a CIDR entry for the same /32 or /128.
    """
    table: PrefixTable[FilterEngine] = PrefixTable()
    for resource, _ in authorized:
        if not isinstance(resource, CidrResource):
            continue
        target = resource.address
        contributors = [
            other.filters
            for other, networks in authorized
            if any(
                network.version == target.version
                and network.prefixlen <= target.prefixlen
                and target.network_address in network
                for network in networks
            )
        ]
        table.insert(target, FilterEngine.from_filter_lists(contributors))
    for raw, filters in proxy_ips:
        network = ipaddress.ip_network(raw)
        table.insert(network, FilterEngine.from_filter_lists([filters]))
    return table
