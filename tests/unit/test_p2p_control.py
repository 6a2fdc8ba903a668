"""Firezone p2p control protocol codec (rust/ip-packet/src/fz_p2p_control.rs)."""

from __future__ import annotations

import ipaddress
import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.packet import ip
from gateway.packet.p2p_control import (
    AssignedIps,
    DomainStatus,
    decode,
    encode_assigned_ips,
    encode_domain_status,
    is_p2p_control,
)

RID = uuid.UUID("619fbe83-bc95-4635-9a08-68da9a944c88")
PROXIES = [
    "100.96.0.1", "100.96.0.2", "100.96.0.3", "100.96.0.4",
    "fd00:2021:1111:8000::", "fd00:2021:1111:8000::1", "fd00:2021:1111:8000::2",
    "fd00:2021:1111:8000::3",
]


def _packet(event_type: int, body: bytes) -> bytes:
    payload = bytes([event_type]) + bytes(7) + body
    return ip.ipv6_header(bytes(16), bytes(16), 255, len(payload), hop_limit=0) + payload


def test_assigned_ips_wire_format_and_round_trip() -> None:
    packet = encode_assigned_ips(RID, "download.httpbin", PROXIES)
    assert packet[0] >> 4 == 6 and packet[6] == 255 and packet[7] == 0
    assert packet[8:40] == bytes(32)
    assert packet[40] == 0 and packet[41:48] == bytes(7)
    assert json.loads(packet[48:]) == {
        "resource": str(RID), "domain": "download.httpbin", "proxy_ips": PROXIES,
    }
    assert is_p2p_control(packet)
    assert decode(packet) == AssignedIps(
        RID, "download.httpbin", tuple(ipaddress.ip_address(p) for p in PROXIES)
    )


def test_domain_status_wire_format() -> None:
    packet = encode_domain_status(RID, "download.httpbin.", True)
    assert packet[40] == 1
    assert packet[48:] == (
        b'{"resource":"619fbe83-bc95-4635-9a08-68da9a944c88",'
        b'"domain":"download.httpbin","status":"Active"}'
    )
    assert decode(packet) == DomainStatus(RID, "download.httpbin", True)
    assert decode(encode_domain_status(RID, "x", False)) == DomainStatus(RID, "x", False)


def test_unknown_status_reads_as_inactive() -> None:
    body = (
        b'{"resource":"00000000-0000-0000-0000-000000000065",'
        b'"domain":"example.com","status":"what_is_this"}'
    )
    assert decode(_packet(1, body)) == DomainStatus(
        uuid.UUID(int=0x65), "example.com", False
    )


def test_ignored_inputs() -> None:
    body = encode_domain_status(RID, "a", True)[48:]
    assert decode(_packet(2, body)) is None  # unknown event type
    assert decode(_packet(0, b"not json")) is None
    assert decode(_packet(0, b'{"resource":"nope","domain":"a","proxy_ips":[]}')) is None
    assert decode(_packet(0, b'{"resource":"' + str(RID).encode() + b'","domain":"a",'
                             b'"proxy_ips":[1]}')) is None
    assert decode(_packet(0, b"[1,2]")) is None
    assert decode(ip.build_udp("::1", "::2", 1, 2, b"x" * 20)) is None
    not_unspecified = bytearray(encode_domain_status(RID, "a", True))
    not_unspecified[23] = 1
    assert decode(bytes(not_unspecified)) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_payloads_never_raise(body: bytes) -> None:
    for event_type in (0, 1):
        result = decode(_packet(event_type, body))
        assert result is None or isinstance(result, AssignedIps | DomainStatus)
