from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gateway.resources import (
    CidrResource,
    DnsResource,
    IcmpFilter,
    InternetResource,
    PortRangeFilter,
    parse_filter,
    parse_resource,
    resource_to_json,
)


def test_every_filter_fixture_parses(portal_fixtures: Path) -> None:
    load = lambda name: json.loads((portal_fixtures / name).read_text())  # noqa: E731
    assert parse_filter(load("filter_tcp.json")) == PortRangeFilter("tcp", 10, 20)
    assert parse_filter(load("filter_udp.json")) == PortRangeFilter("udp", 10, 20)
    assert parse_filter(load("filter_tcp_no_ports.json")) == PortRangeFilter("tcp", 0, 65535)
    assert parse_filter(load("filter_udp_no_ports.json")) == PortRangeFilter("udp", 0, 65535)
    assert parse_filter(load("filter_icmp.json")) == IcmpFilter()


def test_resource_descriptions_fixture(portal_fixtures: Path) -> None:
    items = json.loads((portal_fixtures / "resource_descriptions.json").read_text())
    cidr, dns, internet = (parse_resource(item) for item in items)
    assert isinstance(cidr, CidrResource) and str(cidr.address) == "172.172.0.0/16"
    assert isinstance(dns, DnsResource) and dns.address == "gitlab.mycorp.com"
    assert internet == InternetResource(uuid.UUID("1106047c-cd5d-4151-b679-96b93da7383b"))


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"protocol": "sctp"}, "unknown protocol"),
        ({"protocol": "tcp", "port_range_start": 20, "port_range_end": 10}, "> port_range_end"),
        ({"protocol": "udp", "port_range_start": 70000}, "0..65535"),
        ({"protocol": "udp", "port_range_start": "80"}, "0..65535"),
        ({}, "missing field 'protocol'"),
    ],
)
def test_bad_filters_are_rejected_with_a_clear_message(obj: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_filter(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"id": "c7793628-8579-465b-83e3-1a5d4af4db3b", "type": "cidr", "address": "10.0.0.1/8",
         "name": "x", "filters": []},
        {"id": "c7793628-8579-465b-83e3-1a5d4af4db3b", "type": "cidr", "address": "10.0.0.0",
         "name": "x", "filters": []},
        {"id": "not-a-uuid", "type": "internet"},
        {"id": "c7793628-8579-465b-83e3-1a5d4af4db3b", "type": "dns", "address": "a.example",
         "name": "x"},
        {"id": "c7793628-8579-465b-83e3-1a5d4af4db3b", "type": "gopher"},
    ],
)
def test_bad_resources_are_rejected(obj: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_resource(obj)


def test_round_trip() -> None:
    original = {"id": "c7793628-8579-465b-83e3-1a5d4af4db3b", "type": "dns", "address": "*.corp",
                "name": "corp", "filters": [{"protocol": "icmp"},
                                            {"protocol": "tcp", "port_range_start": 443,
                                             "port_range_end": 443}]}
    assert resource_to_json(parse_resource(original)) == original
