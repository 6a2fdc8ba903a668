"""The drop and event vocabulary (gateway/drops.py): every name the code counts is in it.

The cores, ``status`` and ``/metrics`` share these names, so a counter added under a new
name must be added to :class:`gateway.drops.Drop` (or :class:`Event`) too. The check reads
the source: a name written at a counting site (``counters["..."]``, ``_drop("...")``,
``_limit_hit("...")``, a ``HandshakeRejected`` reason, a ``DROP_*`` constant) or an f-string
prefix there must be known; sites that count a variable pass on one of those names.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from actors.metrics import node_event_samples
from gateway.drops import DROP_PREFIXES, EVENT_PREFIXES, Drop, Event, is_known

REPO = Path(__file__).resolve().parents[2]

_SITE = (
    r"(?:counters\[|\b_drop\(|_limit_hit\(|\bDrop\(|HandshakeRejected\(|"
    r"_open\([^()\n]*?,\s*)\s*"
)
_LITERAL = re.compile(_SITE + r"""(f?)["']([^"'{]*)(\{?)""")
_MEMBER = re.compile(_SITE + r"(Drop|Event|Reason)\.([A-Z0-9_]+)\b")
_CONSTANT = re.compile(r"""^DROP_\w+ = ["'](\w+)["']""", re.M)


def _sources() -> list[Path]:
    return sorted(p for top in ("gateway", "actors") for p in (REPO / top).rglob("*.py"))


def _counted() -> list[tuple[str, str, bool]]:
    """(file, name or prefix, is_prefix) for every literal counting site."""
    found = []
    for path in _sources():
        text = path.read_text()
        where = str(path.relative_to(REPO))
        for match in _LITERAL.finditer(text):
            is_fstring, name, brace = match.groups()
            found.append((where, name, bool(is_fstring and brace)))
        found += [(where, m.group(1), False) for m in _CONSTANT.finditer(text)]
    return found


def test_the_scan_sees_the_counting_sites() -> None:
    """Guards the scan itself: it must find the sites of every counting module."""
    files = {where for where, _, _ in _counted()}
    members = {p.relative_to(REPO).as_posix() for p in _sources()
               if _MEMBER.search(p.read_text())}
    assert {"actors/io/udp.py"} <= files  # run-time suffixes (errno)
    assert {"gateway/peer.py", "gateway/wg/tunnel.py", "gateway/ice/agent.py",
            "gateway/turn/allocation.py", "gateway/node.py", "gateway/session.py",
            "gateway/gateway.py"} <= members


def test_every_counted_name_is_a_drop_or_an_event() -> None:
    unknown = []
    for where, name, is_prefix in _counted():
        if is_prefix:
            if name not in DROP_PREFIXES + EVENT_PREFIXES:
                unknown.append(f"{where}: prefix {name!r}")
        elif not is_known(name):
            unknown.append(f"{where}: {name!r}")
    assert not unknown, "add these to gateway/drops.py:\n" + "\n".join(unknown)


def test_every_member_named_at_a_counting_site_exists() -> None:
    for path in _sources():
        for match in _MEMBER.finditer(path.read_text()):
            kind, name = match.groups()
            enum = Event if kind == "Event" else Drop
            assert name in enum.__members__, f"{path}: {kind}.{name}"


def test_names_are_plain_snake_case_and_not_shared() -> None:
    for member in (*Drop, *Event):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", member.value), member
    assert not {m.value for m in Drop} & {m.value for m in Event}


def test_a_member_and_its_string_are_one_counter_key() -> None:
    """Gradual adoption: sites that still count a literal add to the same key."""
    counters: Counter[str] = Counter()
    counters[Drop.NOT_ALLOWED] += 1
    counters["not_allowed"] += 1
    assert counters == {"not_allowed": 2}
    assert json.dumps(counters) == '{"not_allowed": 2}'  # status is JSON
    samples = node_event_samples({Drop.GARBAGE_DATAGRAM: 3, "resets": 1})
    assert [s[1]["event"] for s in samples] == ["garbage_datagram", "resets"]
    assert all(type(s[1]["event"]) is str for s in samples)


@pytest.mark.parametrize("name", ["send_error_11", "recv_error_104", "error_response_487",
                                  "error_401", "timeout_allocate"])
def test_run_time_suffixes_are_known(name: str) -> None:
    assert is_known(name)


@pytest.mark.parametrize("name", ["", "bogus", "send_error_", "Not_Allowed"])
def test_other_names_are_not(name: str) -> None:
    assert not is_known(name)


def test_what_a_battered_gateway_counts_is_in_the_vocabulary() -> None:
    """Behaviour, not source: a connected gateway (direct and relayed) fed truncated and
    bit-flipped copies of every datagram it received. Everything the node, its relays'
    allocations, its ICE agents and the client's tunnel counted must be known names, also
    those counted under a variable (noise rejections, TURN and ICE error codes)."""
    import random

    from tests.fuzz.seeds import connected_sim, to_gateway
    from tests.sim.test_node_sim import GATEWAY

    rng = random.Random(15)
    counted: set[str] = set()
    for relayed in (False, True):
        sim = connected_sim(relayed=relayed)
        for src, _, payload in to_gateway() * 3:
            mutated = bytearray(payload)
            if mutated and rng.random() < 0.5:
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            else:
                del mutated[rng.randrange(len(mutated) + 1):]
            wg = sim.node.handle_datagram(GATEWAY, src, bytes(mutated), sim.now)
            if wg is not None and sim.gw_tunnel is not None:
                sim.gw_tunnel.decapsulate(wg.datagram, wg.src, sim.now, sim.clock.unix())
        sim.node.handle_timeout(sim.now + 1.0)
        counters: list[Counter[str]] = [sim.node.counters]
        counters += [a.counters for a in sim.node._allocations.values()]
        counters += [c.agent.counters for c in sim.node._connections.values()]
        if sim.gw_tunnel is not None:
            counters.append(sim.gw_tunnel.counters)
        for counter in counters:
            counted |= {name for name, count in counter.items() if count}
    assert counted, "the mutations were all accepted: the test exercises nothing"
    assert {name for name in counted if not is_known(name)} == set()
