"""Development portal configuration: the example parses, typos and bad values are refused."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest

from devportal.config import ConfigError, load_config, parse_config
from gateway.resources import CidrResource, IcmpFilter, PortRangeFilter

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "devportal.yaml"
RID = "0b3c6d7e-1f2a-4b5c-8d9e-0f1a2b3c4d5e"
BASE: dict[str, Any] = {
    "gateway_tokens": ["t"],
    "clients": [{"name": "alice", "token": "a"}],
    "resources": [{"id": RID, "type": "cidr", "address": "10.0.0.0/8"}],
    "policies": [{"client": "alice", "resources": [RID]}],
}


def test_the_annotated_example_parses() -> None:
    config = load_config(EXAMPLE)
    assert config.gateway_tokens and config.clients and config.relays
    office = config.resource(uuid.UUID(RID))
    assert isinstance(office, CidrResource)
    assert office.filters == (
        PortRangeFilter("tcp", 22, 22),
        PortRangeFilter("tcp", 80, 80),
        PortRangeFilter("tcp", 8000, 8100),
        PortRangeFilter("udp", 53, 53),
        IcmpFilter(),
    )
    assert config.allowed("bob", uuid.UUID(RID)) is not None
    assert str(config.ipv4_pool) == "100.64.0.0/11"


def test_friendly_filters() -> None:
    data = copy.deepcopy(BASE)
    data["resources"][0]["filters"] = {"tcp": True, "udp": [], "icmp": False}
    (resource,) = parse_config(data).resources
    assert resource.filters == (PortRangeFilter("tcp"), PortRangeFilter("udp"))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("resources", 0, "adress"), "x", r"resources\[0\]: unknown key\(s\) \['adress'\]"),
        (("typo_top",), 1, r"config: unknown key\(s\) \['typo_top'\]"),
        (("resources", 0, "type"), "ip", r"resources\[0\]\.type"),
        (("resources", 0, "address"), "10.0.0.1/8", r"resources\[0\]\.address"),
        (("resources", 0, "filters"), {"tcp": ["90-80"]}, r"filters\.tcp\[0\]"),
        (("resources", 0, "filters"), {"sctp": [1]}, r"unknown key\(s\) \['sctp'\]"),
        (("policies", 0, "client"), "mallory", "no client named 'mallory'"),
        (("policies", 0, "resources"), [str(uuid.UUID(int=1))], "no resource with id"),
        (("policies", 0, "expires_in"), -5, "expires_in"),
        (("listen",), {"port": 70000}, "listen.port"),
    ],
)
def test_bad_configs_are_refused_clearly(path: tuple[Any, ...], value: Any, message: str) -> None:
    data = copy.deepcopy(BASE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_gateway_tokens_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway_tokens"):
        parse_config({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway_tokens: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
