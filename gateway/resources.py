"""Resources and filters as the portal describes them (rust/connlib/tunnel/src/messages/gateway.rs:
``ResourceDescription``, ``Filter``).

Immutable models plus strict parsers. Parsers raise :class:`~gateway.errors.MalformedMessage`
(a ``ValueError``) with a message naming the offending field, and nothing else; the
portal-message layer turns that into "drop the whole message".
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from gateway.errors import MalformedMessage

IpNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A DNS resource's address is a name (at most 253 characters) or a glob over one; this
#: is a generous bound on what the per-name matching (gateway.dns_pattern) walks.
MAX_DNS_ADDRESS = 1024


@dataclass(frozen=True, slots=True)
class PortRangeFilter:
    """A TCP or UDP filter: destination ports ``start..end`` inclusive."""

    protocol: str  # "tcp" or "udp"
    start: int = 0
    end: int = 65535


@dataclass(frozen=True, slots=True)
class IcmpFilter:
    """Allows ICMPv4 and ICMPv6 (any type)."""

    protocol: str = "icmp"


Filter: TypeAlias = PortRangeFilter | IcmpFilter


@dataclass(frozen=True, slots=True)
class CidrResource:
    id: uuid.UUID
    address: IpNetwork
    name: str
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class DnsResource:
    """``address``: a domain or a pattern (``*``, ``**``, ``?``); see gateway.dns_pattern."""

    id: uuid.UUID
    address: str
    name: str
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class InternetResource:
    """Everything outside the DNS proxy ranges; no filters (permit all)."""

    id: uuid.UUID
    filters: tuple[Filter, ...] = ()


Resource: TypeAlias = CidrResource | DnsResource | InternetResource


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise MalformedMessage(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        raise MalformedMessage(f"{where}: missing field {key!r}")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _require(obj, key, where)
    if not isinstance(value, str):
        raise MalformedMessage(f"{where}.{key}: expected a string")
    return value


def parse_uuid(value: Any, where: str) -> uuid.UUID:
    """A UUID string (any case, hyphenated or not, as Rust's uuid crate accepts)."""
    if not isinstance(value, str) or not value.isascii() or len(value) > 45:
        raise MalformedMessage(f"{where}: expected a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise MalformedMessage(f"{where}: not a UUID: {value!r}") from None


def parse_network(value: Any, where: str) -> IpNetwork:
    """A CIDR with explicit prefix and zero host bits (``10.0.0.1/8`` is rejected)."""
    if not isinstance(value, str) or "/" not in value or "%" in value or len(value) > 64:
        raise MalformedMessage(f"{where}: expected a CIDR like 10.0.0.0/8, got {value!r:.64}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise MalformedMessage(f"{where}: invalid CIDR {value!r}: {exc}") from None


def _port(obj: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise MalformedMessage(f"{where}.{key}: expected a port number 0..65535, got {value!r}")
    return value


def parse_filter(obj: Any, where: str = "filter") -> Filter:
    protocol = _string(obj, "protocol", where)
    if protocol == "icmp":
        return IcmpFilter()
    if protocol in ("tcp", "udp"):
        start = _port(obj, "port_range_start", 0, where)
        end = _port(obj, "port_range_end", 65535, where)
        if start > end:
            raise MalformedMessage(f"{where}: port_range_start {start} > port_range_end {end}")
        return PortRangeFilter(protocol, start, end)
    raise MalformedMessage(f"{where}.protocol: unknown protocol {protocol!r:.40}")


def parse_filters(value: Any, where: str) -> tuple[Filter, ...]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{where}: expected an array of filters")
    return tuple(parse_filter(item, f"{where}[{i}]") for i, item in enumerate(value))


def parse_resource(obj: Any, where: str = "resource") -> Resource:
    """Parse a ResourceDescription; unknown fields are ignored, as the portal relies on."""
    kind = _string(obj, "type", where)
    rid = parse_uuid(_require(obj, "id", where), f"{where}.id")
    if kind == "internet":
        return InternetResource(rid)
    if kind == "cidr":
        return CidrResource(
            rid,
            parse_network(_require(obj, "address", where), f"{where}.address"),
            _string(obj, "name", where),
            parse_filters(_require(obj, "filters", where), f"{where}.filters"),
        )
    if kind == "dns":
        address = _string(obj, "address", where)
        if not address or address.endswith(".") or len(address) > MAX_DNS_ADDRESS:
            raise MalformedMessage(
                f"{where}.address: expected a domain or pattern without trailing dot, "
                f"at most {MAX_DNS_ADDRESS} characters"
            )
        return DnsResource(
            rid,
            address,
            _string(obj, "name", where),
            parse_filters(_require(obj, "filters", where), f"{where}.filters"),
        )
    raise MalformedMessage(f"{where}.type: unknown resource type {kind!r:.40}")


def filter_to_json(flt: Filter) -> dict[str, Any]:
    if isinstance(flt, IcmpFilter):
        return {"protocol": "icmp"}
    return {"protocol": flt.protocol, "port_range_start": flt.start, "port_range_end": flt.end}


def resource_to_json(resource: Resource) -> dict[str, Any]:
    """The portal's JSON shape (used by the development portal and round-trip tests)."""
    if isinstance(resource, InternetResource):
        return {"id": str(resource.id), "type": "internet"}
    kind = "cidr" if isinstance(resource, CidrResource) else "dns"
    return {
        "id": str(resource.id),
        "type": kind,
        "address": str(resource.address),
        "name": resource.name,
        "filters": [filter_to_json(f) for f in resource.filters],
    }
