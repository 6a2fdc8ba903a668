"""Firezone p2p control protocol inside the tunnel (rust/ip-packet/src/fz_p2p_control.rs,
rust/connlib/tunnel/src/p2p_control.rs).

An IPv6 packet from ``::`` to ``::`` with next header 255 whose payload is one event-type
byte, seven reserved bytes and UTF-8 JSON. Clients send AssignedIps (type 0); the gateway
answers DomainStatus (type 1). Unknown event types and undecodable payloads read as None.

:func:`decode` accepts only what the reply can carry: a domain of at most
:data:`MAX_DOMAIN_BYTES` bytes of UTF-8 without control characters (a DNS name has at most
253 characters; JSON's ``\\uXXXX`` escapes make at most 3 characters of each byte, 759 in
the DomainStatus payload, well under its 1280 bytes) and at most :data:`MAX_PROXY_IPS`
proxy IPs (1.4 clients send 8), so :func:`encode_domain_status` cannot fail on a decoded
event.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import LocalProtocolError
from gateway.packet.ip import PROTO_P2P_CONTROL, AddressLike, IPAddress, ipv6_header

ASSIGNED_IPS = 0
DOMAIN_STATUS = 1

_UNSPECIFIED = bytes(16)
_MAX_PAYLOAD = 1280
MAX_DOMAIN_BYTES = 253
MAX_PROXY_IPS = 64
_CONTROL = re.compile("[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class AssignedIps:
    """Client -> gateway: the proxy IPs the client gave ``domain`` of ``resource_id``."""

    resource_id: uuid.UUID
    domain: str
    proxy_ips: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """Gateway -> client: whether NAT for ``domain`` is set up (``"Active"``)."""

    resource_id: uuid.UUID
    domain: str
    active: bool


def is_p2p_control(packet: bytes) -> bool:
    """IPv6, next header 255, source and destination ``::`` (a valid packet is assumed)."""
    return (
        packet[0] >> 4 == 6
        and packet[6] == PROTO_P2P_CONTROL
        and packet[8:40] == b"\x00" * 32
    )


def _encode(event_type: int, body: Mapping[str, object]) -> bytes:
    payload = bytes((event_type,)) + bytes(7) + json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > _MAX_PAYLOAD:
        raise LocalProtocolError("p2p control payload exceeds 1280 bytes")
    return ipv6_header(_UNSPECIFIED, _UNSPECIFIED, PROTO_P2P_CONTROL, len(payload), hop_limit=0) + (
        payload
    )


def encode_assigned_ips(
    resource_id: uuid.UUID, domain: str, proxy_ips: Sequence[AddressLike]
) -> bytes:
    """The full IPv6 packet of an AssignedIps event."""
    ips = [str(ipaddress.ip_address(ip)) for ip in proxy_ips]
    body = {"resource": str(resource_id), "domain": domain.rstrip("."), "proxy_ips": ips}
    return _encode(ASSIGNED_IPS, body)


def encode_domain_status(resource_id: uuid.UUID, domain: str, active: bool) -> bytes:
    """The full IPv6 packet of a DomainStatus event."""
    body = {
        "resource": str(resource_id),
        "domain": domain.rstrip("."),
        "status": "Active" if active else "Inactive",
    }
    return _encode(DOMAIN_STATUS, body)


def decode(packet: bytes) -> AssignedIps | DomainStatus | None:
    """The event in a p2p control packet; None if it is not one, unknown, or malformed."""
    if len(packet) < 48 or not is_p2p_control(packet):
        return None
    payload = packet[40 : 40 + ((packet[4] << 8) | packet[5])]
    if len(payload) < 8 or payload[0] not in (ASSIGNED_IPS, DOMAIN_STATUS):
        return None
    try:
        body = json.loads(payload[8:].decode("utf-8"))
        if not isinstance(body, dict):
            return None
        resource = body["resource"]
        if not isinstance(resource, str) or not resource.isascii():
            return None
        resource_id = uuid.UUID(resource)
        domain = body["domain"]
        if not isinstance(domain, str):
            return None
        domain = domain.rstrip(".")
        if len(domain.encode("utf-8")) > MAX_DOMAIN_BYTES or _CONTROL.search(domain):
            return None  # a lone surrogate raises in encode(): None as well
        if payload[0] == DOMAIN_STATUS:
            return DomainStatus(resource_id, domain, body.get("status") == "Active")
        proxy_ips = body["proxy_ips"]
        if (
            not isinstance(proxy_ips, list)
            or len(proxy_ips) > MAX_PROXY_IPS
            or not all(isinstance(ip, str) for ip in proxy_ips)
        ):
            return None
        return AssignedIps(
            resource_id, domain, tuple(ipaddress.ip_address(ip) for ip in proxy_ips)
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
