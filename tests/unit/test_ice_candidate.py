"""Candidate strings, priorities, foundations and credentials (rust/connlib/snownet/src/node.rs)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from gateway.ice.candidate import Candidate, IceCredentials, prflx_priority

SPEC_EXAMPLES = [
    "candidate:fffeff643e9a0c5d71b2f8e4 1 udp 1694498559 35.204.11.9 42881 typ srflx",
    "candidate:fffeff7e9c0d2b4e81a3f6c2 1 udp 2130706175 192.168.1.23 51820 typ host",
    "candidate:fffeff644a1c7e0b39d2f5a8 1 udp 1694498559 87.121.72.60 57114 typ srflx",
    "candidate:fffeff02d81b6c3f0e29a7c4 1 udp 50331391 34.80.2.41 61234 typ relay",
    "candidate:fffeff02a3b1c7d9e0f24c61 1 udp 50331391 34.80.2.41 50122 typ relay",
    "candidate:fffeff7e5b2c9d1e0a4f3b21 1 udp 2130706175 10.128.0.5 42881 typ host",
]


def _fixture_candidates(portal_fixtures: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(portal_fixtures.glob("*.json")):
        found += re.findall(r"candidate:[^\"]*", path.read_text())
    return found


def test_every_fixture_and_spec_candidate_round_trips(portal_fixtures: Path) -> None:
    lines = _fixture_candidates(portal_fixtures)
    assert lines, "the portal fixtures carry candidate strings"
    for line in lines + SPEC_EXAMPLES:
        c = Candidate.parse(line)
        assert c.to_sdp() == line
        assert c.component == 1


def test_fixture_srflx_fields(portal_fixtures: Path) -> None:
    msg = json.loads((portal_fixtures / "invalidate_ice_candidates.json").read_text())
    c = Candidate.parse(msg["payload"]["candidates"][0])
    assert c == Candidate("srflx", ("172.28.0.100", 47717), 1694498559, "7854631899965427361")


@pytest.mark.parametrize(
    "suffix, related",
    [
        (" raddr 198.51.100.1 rport 40000", ("198.51.100.1", 40000)),
        (" tcptype passive", None),
        (" generation 0", None),
        (" network-id 1 network-cost 10", None),
        (" ufrag abcd", None),
        (
            " raddr 0.0.0.0 rport 0 generation 0 network-id 2 ufrag Zx9+ network-cost 999",
            ("0.0.0.0", 0),
        ),
    ],
)
def test_optional_tokens_accepted(suffix: str, related: tuple[str, int] | None) -> None:
    c = Candidate.parse("candidate:1 1 UDP 1694498559 1.2.3.4 5 typ srflx" + suffix)
    assert c.address == ("1.2.3.4", 5)
    assert c.related == related
    assert c.to_sdp() == "candidate:1 1 udp 1694498559 1.2.3.4 5 typ srflx"


def test_aioice_form_without_prefix_and_ipv6_normalised() -> None:
    c = Candidate.parse("6815297761 1 udp 659136 2001:DB8:0:0::1 31102 typ host")
    assert c.address == ("2001:db8::1", 31102)
    assert c.foundation == "6815297761"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "candidate:",
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ",  # no kind
        "candidate:1 1 udp 2130706175 1.2.3.4 5 type host",  # misspelled typ
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ bogus",  # unknown kind
        "candidate:1 1 tcp 2130706175 1.2.3.4 5 typ host",  # not UDP
        "candidate:1 0 udp 2130706175 1.2.3.4 5 typ host",  # component 0
        "candidate:1 x udp 2130706175 1.2.3.4 5 typ host",  # component not a number
        "candidate:1 1 udp -5 1.2.3.4 5 typ host",  # negative priority
        "candidate:1 1 udp 0 1.2.3.4 5 typ host",  # priority 0
        "candidate:1 1 udp 99999999999 1.2.3.4 5 typ host",  # priority too large
        "candidate:1 1 udp 2130706175 1.2.3 5 typ host",  # bad IPv4
        "candidate:1 1 udp 2130706175 abc.local 5 typ host",  # mDNS hostname
        "candidate:1 1 udp 2130706175 1.2.3.4 0 typ host",  # port 0
        "candidate:1 1 udp 2130706175 1.2.3.4 70000 typ host",  # port too large
        "candidate:1 1 udp 2130706175 1.2.3.4 5x typ host",  # port not a number
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host raddr",  # dangling token
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host raddr 1.2.3.4",  # raddr w/o rport
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host rport 7",  # rport w/o raddr
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host raddr x rport 7",  # bad raddr
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host raddr 1.2.3.4 rport -1",
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host generation 0 generation 1",
        "candidate:1 1 udp 2130706175 1.2.3.4 5 typ host foo bar",  # unknown extension
        "candidate:1 1 udp 2130706175 1.2.3.4  5 typ host",  # double space
        "candidate:" + "a" * 33 + " 1 udp 2130706175 1.2.3.4 5 typ host",  # long foundation
        "candidate:f-o 1 udp 2130706175 1.2.3.4 5 typ host",  # '-' is no ice-char
        "candidate:1 1 udp 2130706175 fe80::1%eth0 5 typ host",  # zone id
    ],
)
def test_malformed_lines_rejected(line: str) -> None:
    with pytest.raises(ValueError):
        Candidate.parse(line)


def test_priorities_match_the_spec() -> None:
    assert Candidate.host(("10.0.0.1", 1)).priority == 2130706175
    assert Candidate.host(("2001:db8::1", 1)).priority == 2130706431
    assert Candidate.srflx(("35.204.11.9", 42881), ("10.0.0.1", 42881)).priority == 1694498559
    assert Candidate.relay(("34.80.2.41", 61234), "relay-1").priority == 50331391
    assert prflx_priority(2130706175) == (110 << 24) | (65534 << 8) | 255
    assert prflx_priority(50331391) == 1862270719


def test_local_candidate_bases() -> None:
    host = Candidate.host(("10.0.0.1", 1))
    srflx = Candidate.srflx(("35.204.11.9", 2), ("10.0.0.1", 1))
    relay = Candidate.relay(("34.80.2.41", 3), "r1")
    assert host.base == host.address
    assert srflx.base == ("10.0.0.1", 1)
    assert relay.base == relay.address and relay.relay_id == "r1"


def test_foundation_stable_per_kind_and_base_ip() -> None:
    a = Candidate.host(("10.0.0.1", 1))
    assert a.foundation == Candidate.host(("10.0.0.1", 2)).foundation
    assert a.foundation != Candidate.host(("10.0.0.2", 1)).foundation
    assert a.foundation != Candidate.relay(("10.0.0.1", 1), "r").foundation
    s1 = Candidate.srflx(("1.1.1.1", 1), ("10.0.0.1", 1))
    assert s1.foundation == Candidate.srflx(("2.2.2.2", 1), ("10.0.0.1", 9)).foundation
    for c in (a, s1):
        assert re.fullmatch(r"[A-Za-z0-9+/]{1,32}", c.foundation)
        assert Candidate.parse(c.to_sdp()).foundation == c.foundation


def test_credentials_random_and_repr_hides_password() -> None:
    creds = IceCredentials.random(random.Random(1))
    assert re.fullmatch(r"[A-Za-z0-9]{4}", creds.ufrag)
    assert re.fullmatch(r"[A-Za-z0-9]{22}", creds.pwd)
    assert creds != IceCredentials.random(random.Random(2))
    assert creds.pwd not in repr(creds) and creds.ufrag in repr(creds)
