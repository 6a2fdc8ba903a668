"""End to end: a portal reconnect must not break established tunnels.

The real portal sends fresh TURN credentials (new username and password for the same relay
id and addresses) with every ``init``, i.e. after every reconnect; so does the development
portal. The gateway replaces its allocation on that relay, and whatever it does there must
leave the client's working path alone: the client's UDP keeps reaching the resource,
reconnect after reconnect, also in the seconds after each one while the replacement
allocation is made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import CIDR_RESOURCE, Stack
from devstack.topology import ADDRESSES, RESOURCE
from tests.e2e.hostile import running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]

RECONNECTS = 3
#: How long traffic is checked after each reconnect: past the replacement allocation
#: (made about a second after the ``init``) and its candidate signalling.
WATCH = 4.0


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as built:
        yield built


def _ready(client: Any, timeout: float = 45.0) -> str:
    return client.wait_line(  # type: ignore[no-any-return]
        lambda line: line.startswith("READY") and f"resource={CIDR_RESOURCE}" in line,
        timeout=timeout,
    )


def _gateway_inits(e2e: Stack, after: int = 0) -> list[tuple[str, ...]]:
    """The TURN usernames of every ``init`` the portal sent a gateway (from ``after``)."""
    assert e2e.portal is not None
    return [
        tuple(sorted(r["username"] for r in e.payload["relays"]))
        for e in e2e.portal.events[after:]
        if e.direction == "out" and e.event == "init" and e.kind == "gateway"
    ]


def _reconnect_and_watch(e2e: Stack, tag: str, *, restart: bool = False) -> None:
    """Drop the gateway's portal socket (or restart the portal: the client reconnects
    too), check the gateway got rotated TURN credentials, and check every echo through
    the tunnel for ``WATCH`` seconds after the new ``init``."""
    portal = e2e.portal
    assert portal is not None
    before = _gateway_inits(e2e)[-1]
    mark = len(portal.events)
    if restart:
        portal.stop()
        e2e.start_portal()
    else:
        assert portal.drop_gateway(portal.gateways()[0].id) == 1
    assert portal.wait_for(lambda p: bool(_gateway_inits(e2e, mark)), timeout=20), e2e.logs()
    (after,) = _gateway_inits(e2e, mark)
    assert after != before, "the portal must rotate TURN credentials on every init"
    deadline = time.monotonic() + WATCH
    lost = []
    n = 0
    while time.monotonic() < deadline:
        payload = f"{tag} {n}".encode()
        if e2e.udp_echo(RESOURCE, 7000, payload, timeout=1.0) != payload:
            lost.append(n)
        n += 1
        time.sleep(0.1)
    # The end of the window must work: a lost datagram early on could be noise, a tunnel
    # that stopped carrying traffic is the defect.
    final = [e2e.udp_echo(RESOURCE, 7000, f"{tag} final".encode(), timeout=1.0)
             for _ in range(3)]
    assert f"{tag} final".encode() in final, (lost, n, e2e.logs())
    assert len(lost) <= 1, (lost, n, e2e.logs())


def _reconnects_keep_traffic(e2e: Stack, *, restart: bool = False) -> None:
    """Several reconnects in a row; afterwards the gateway's path, its relayed address
    and everything it told the client about its candidates are unchanged."""
    assert e2e.portal is not None
    (entry,) = e2e.gateway_status()["clients"]
    path = entry["path"]
    (relay,) = e2e.gateway_status()["relays"]
    mark = len(e2e.portal.events)
    for round_ in range(RECONNECTS):
        _reconnect_and_watch(e2e, f"round{round_}", restart=restart)
        e2e.wait_gateway_ready()
    (entry,) = e2e.gateway_status()["clients"]
    assert entry["path"] == path, (entry, e2e.logs())
    assert e2e.gateway_status()["relays"] == [relay], e2e.logs()
    invalidated = [e.payload for e in e2e.portal.events[mark:]
                   if e.kind == "gateway" and e.event == "broadcast_invalidated_ice_candidates"]
    assert invalidated == [], invalidated


def test_direct_path_survives_portal_reconnects_with_rotated_turn_credentials(
    e2e: Stack,
) -> None:
    """Host to host: the path never used the allocation, but the client must not be told
    to drop the gateway's relayed candidate (its fallback) on every reconnect."""
    client = e2e.start_client(CIDR_RESOURCE)
    assert "path=direct" in _ready(client), e2e.logs()
    assert any(e2e.udp_echo(RESOURCE, 7000, b"before", timeout=1.0) == b"before"
               for _ in range(5))
    _reconnects_keep_traffic(e2e)


@pytest.mark.parametrize("restart", [False, True], ids=["socket-dropped", "portal-restart"])
def test_relayed_path_survives_portal_reconnects_with_rotated_turn_credentials(
    e2e: Stack, restart: bool,
) -> None:
    """Client and gateway cannot reach each other and the client cannot allocate: the only
    path is the gateway's own allocation, the one whose credentials rotate."""
    e2e.topo.block("client", ADDRESSES["gateway"])
    e2e.topo.block("gateway", ADDRESSES["client"])
    e2e.topo.block_udp_port("client", ADDRESSES["relay"], e2e.coturn.port)
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client)
    assert any(e2e.udp_echo(RESOURCE, 7000, b"before", timeout=1.0) == b"before"
               for _ in range(5))
    (entry,) = e2e.gateway_status()["clients"]
    assert entry["path"].startswith("relay:"), entry
    _reconnects_keep_traffic(e2e, restart=restart)
