"""No single input may stop or wedge the gateway (README, "Supervision"), end to end.

The real gateway process in network namespaces, with the dev portal sending what a broken
or hostile portal could: a flow for a client whose public key is a low-order point (its
PeerActor failed, and the node's next tell to it used to kill the process), and a frame
nested 1,200 levels deep (the PortalActor failed silently: /readyz stayed 200 and a later
``reject_access`` never arrived). Whichever layer stops such input (a parser, a core
check, or supervision), the process must live and keep doing its job.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import CIDR_RESOURCE, Stack
from devstack.topology import RESOURCE
from gateway.resources import resource_to_json
from tests.e2e.hostile import echo_works, readyz, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]

ZERO_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
MALLORY = uuid.UUID("6d3f2a10-5b7c-4e8d-9f01-23456789abcd")


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as built:
        yield built


def _alice_passes_traffic(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE)
    client.wait_line(lambda line: line.startswith("READY") and f"resource={CIDR_RESOURCE}"
                     in line, timeout=30)
    assert echo_works(e2e, b"before"), e2e.logs()


def _alive(e2e: Stack) -> None:
    assert e2e.gateway is not None
    assert e2e.gateway.popen.poll() is None, e2e.logs()


def _flow_for_a_low_order_key(e2e: Stack) -> dict[str, Any]:
    assert e2e.portal is not None
    resource = next(r for r in e2e.portal.config.resources if r.id == CIDR_RESOURCE)
    return {
        "ref": "mallory-flow",
        "flow_id": str(uuid.uuid4()),
        "actor": {"id": str(uuid.uuid4())},
        "resource": resource_to_json(resource),
        "expires_at": None,
        "client": {
            "id": str(MALLORY),
            "public_key": ZERO_KEY,
            "preshared_key": "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
            "ipv4": "100.64.0.250",
            "ipv6": "fd00:2021:1111::fa",
        },
        "client_ice_credentials": {"username": "mllr", "password": "mallorymallorymallory1"},
        "gateway_ice_credentials": {"username": "gwgw", "password": "gatewaygatewaygateway1"},
    }


def test_a_flow_whose_peer_fails_costs_that_client_only(e2e: Stack) -> None:
    _alice_passes_traffic(e2e)
    assert e2e.portal is not None
    flow = _flow_for_a_low_order_key(e2e)
    assert e2e.portal.push_to_gateway("authorize_flow", flow) == 1
    time.sleep(1.0)  # its PeerActor, if one started, has failed by now (it takes ms)
    # Again (the node then tells a failed PeerActor, if it kept one), and a change every
    # PeerActor is told about.
    assert e2e.portal.push_to_gateway("authorize_flow", flow) == 1
    assert e2e.portal.push_to_gateway("resource_updated", flow["resource"]) == 1
    deadline = time.monotonic() + 10
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _alive(e2e)
        status = e2e.gateway_status()  # answers: the node lives
        if all(c["client_id"] != str(MALLORY) for c in status["clients"]):
            break
        time.sleep(0.2)
    assert all(c["client_id"] != str(MALLORY) for c in status["clients"]), status
    _alive(e2e)
    assert readyz(e2e) == "200"
    assert echo_works(e2e, b"after the bad flow"), e2e.logs()
    assert e2e.gateway is not None
    assert "Eventloop failed" not in "\n".join(e2e.gateway.lines)


def test_a_frame_nested_too_deep_neither_stops_nor_wedges_the_portal_connection(
    e2e: Stack,
) -> None:
    _alice_passes_traffic(e2e)
    assert e2e.portal is not None
    portal = e2e.portal
    before = portal.gateways()[0].connections
    deep = ('{"topic":"gateway","event":"x","payload":' + "[" * 1200 + "]" * 1200
            + ',"ref":null}')
    assert portal.push_raw_to_gateway(deep) == 1
    # Either the frame is refused where it is parsed (the connection stays), or the portal
    # actor fails and is replaced: then a fresh connection joins, the old one is gone.
    if portal.wait_for(lambda p: p.gateways()[0].connections > before, timeout=5):
        assert portal.wait_for(lambda p: p.gateways()[0].open_sockets == 1, timeout=10)
    _alive(e2e)
    e2e.wait_gateway_ready()
    assert readyz(e2e) == "200"
    assert echo_works(e2e, b"after the deep frame"), e2e.logs()
    # The portal connection still works: a revocation takes effect.
    assert portal.reject_access("alice", CIDR_RESOURCE) == 1
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and e2e.udp_echo(RESOURCE, 7000, b"x", 0.3) is not None:
        pass
    assert e2e.udp_echo(RESOURCE, 7000, b"after reject", timeout=1.0) is None, e2e.logs()
    _alive(e2e)
    assert readyz(e2e) == "200"
