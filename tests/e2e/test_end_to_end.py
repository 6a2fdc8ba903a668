"""End to end: portal, relay (coturn), gateway, development client and resources, each in
its own network namespace; nothing leaves them.

1. direct path: TCP and UDP to a CIDR resource, both directions, and a DNS resource;
2. relayed path when client and gateway cannot reach each other (nftables);
3. filters: allowed port, disallowed port, unauthorized resource, spoofed source;
4. reject_access and expiry cut traffic within 2 s;
5. roaming client keeps its key; gateway reset rotates the key, old PeerActors are gone;
6. portal restart during a transfer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import (
    CIDR_RESOURCE,
    DNS_NAME,
    DNS_RESOURCE,
    FILTERED_RESOURCE,
    Stack,
    stack,
)
from devstack.topology import ADDRESSES, RESOURCE
from gateway.packet.ip import build_udp
from tests.support.interop import require_bin, require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]


@pytest.fixture
def e2e(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    require_netns()
    require_bin("turnserver", "coturn")
    require_bin("nft", "nftables")
    require_bin("curl", "curl")
    expires_in = getattr(request, "param", None)
    with stack(tmp_path, expires_in=expires_in) as built:
        built.topo.set_hosts("gateway", {DNS_NAME: RESOURCE})
        built.start_portal()
        built.start_resource_servers()
        built.start_gateway()
        try:
            built.wait_gateway_ready()
            yield built
        except BaseException:
            print(built.logs())
            raise


def _ready(client_proc: object, resource: object, timeout: float = 30.0, after: int = 0) -> str:
    return client_proc.wait_line(  # type: ignore[attr-defined,no-any-return]
        lambda line: line.startswith("READY") and f"resource={resource}" in line,
        timeout=timeout, after=after,
    )


def _echo_works(e2e: Stack, ip: str, port: int, payload: bytes, tries: int = 5) -> bool:
    return any(e2e.udp_echo(ip, port, payload, timeout=1.0) == payload for _ in range(tries))


def test_direct_path_tcp_udp_and_dns_resource(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE, DNS_RESOURCE,
                              extra=("--dns-domain", f"{DNS_RESOURCE}={DNS_NAME}"))
    line = _ready(client, CIDR_RESOURCE)
    assert "path=direct" in line, e2e.logs()
    # TCP, resource -> client direction carries the response body.
    result = e2e.http_get(f"http://{RESOURCE}:8080/index.html")
    assert result.returncode == 0 and "hello through the tunnel" in result.stdout, result.stderr
    # UDP both ways.
    assert _echo_works(e2e, RESOURCE, 7000, b"ping over udp")
    # The DNS resource: the client assigned proxy IPs and the gateway resolved the name.
    dns_line = client.wait_line(lambda s: s.startswith("DNS ") and "status=Active" in s, 30)
    proxy_ips = dns_line.split("proxy_ips=")[1].split()[0].split(",")
    result = e2e.http_get(f"http://{proxy_ips[0]}:8080/index.html")
    assert "hello through the tunnel" in result.stdout, (result.stderr, e2e.logs())
    # The name resolves to IPv4 only: an IPv6 proxy IP is translated (NAT64) and back.
    proxy_v6 = next(ip for ip in proxy_ips if ":" in ip)
    result = e2e.http_get(f"http://[{proxy_v6}]:8080/index.html")
    assert "hello through the tunnel" in result.stdout, (result.stderr, e2e.logs())
    status = e2e.gateway_status()
    (entry,) = status["clients"]
    assert entry["path"] == "direct" and entry["rx_bytes"] > 0 and entry["tx_bytes"] > 0


def test_relayed_path_when_direct_is_blocked(e2e: Stack) -> None:
    """Client and gateway cannot reach each other; the client only offers its relayed
    address, so the gateway reaches it through coturn (from the gateway's side the path is
    its host socket to the client's allocation on the relay)."""
    e2e.topo.block("client", ADDRESSES["gateway"])
    e2e.topo.block("gateway", ADDRESSES["client"])
    client = e2e.start_client(CIDR_RESOURCE, extra=("--relay-only",))
    _ready(client, CIDR_RESOURCE, timeout=45)
    result = e2e.http_get(f"http://{RESOURCE}:8080/index.html")
    assert "hello through the tunnel" in result.stdout, (result.stderr, e2e.logs())
    assert _echo_works(e2e, RESOURCE, 7000, b"relayed udp")
    (entry,) = e2e.gateway_status()["clients"]
    assert entry["remote"].startswith(ADDRESSES["relay"] + ":"), entry


def test_gateway_relays_through_its_own_allocation(e2e: Stack) -> None:
    """The client cannot allocate (its TURN port is blocked) nor reach the gateway: the
    only working pair is the gateway's relayed candidate, so the gateway sends ChannelData
    through its own allocation."""
    e2e.topo.block("client", ADDRESSES["gateway"])
    e2e.topo.block("gateway", ADDRESSES["client"])
    e2e.topo.block_udp_port("client", ADDRESSES["relay"], e2e.coturn.port)
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client, CIDR_RESOURCE, timeout=45)
    assert _echo_works(e2e, RESOURCE, 7000, b"via the gateway's relay")
    result = e2e.http_get(f"http://{RESOURCE}:8080/index.html")
    assert "hello through the tunnel" in result.stdout, (result.stderr, e2e.logs())
    (entry,) = e2e.gateway_status()["clients"]
    assert entry["path"].startswith("relay:"), entry


def test_filters_spoofing_and_unauthorized_resources(e2e: Stack) -> None:
    # Only 10.204.0.3/32 (UDP 7000 allowed) is authorized for this client.
    client = e2e.start_client(FILTERED_RESOURCE)
    _ready(client, FILTERED_RESOURCE)
    assert _echo_works(e2e, "10.204.0.3", 7000, b"allowed port")
    assert e2e.udp_echo("10.204.0.3", 7001, b"disallowed port", timeout=1.0) is None
    # What a well-behaved client never sends, injected into its tunnel to the gateway:
    # a destination the gateway has not authorized for it, and a forged source address.
    tunnel_ip = client.wait_line(lambda s: s.startswith("INTERFACE")).split()[1].split("=")[1]
    unauthorized = build_udp(tunnel_ip, RESOURCE, 4000, 7000, b"not authorized")
    spoofed = build_udp("100.64.99.99", "10.204.0.3", 4000, 7000, b"spoofed")
    for packet in (unauthorized, spoofed):
        e2e.client_command(client, f"inject {FILTERED_RESOURCE} {packet.hex()}")
    deadline = time.monotonic() + 10
    drops: dict[str, int] = {}
    while time.monotonic() < deadline:
        (entry,) = e2e.gateway_status()["clients"]
        drops = entry["drops"]
        if drops.get("spoofed_source", 0) >= 1 and drops.get("not_allowed", 0) >= 2:
            break
        time.sleep(0.2)
    assert drops.get("spoofed_source", 0) == 1, drops
    assert drops.get("not_allowed", 0) == 2, drops  # port 7001 and the unauthorized host
    assert e2e.resource_received("not authorized") is False
    assert e2e.resource_received("spoofed") is False


def test_reject_access_cuts_traffic_within_two_seconds(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client, CIDR_RESOURCE)
    assert _echo_works(e2e, RESOURCE, 7000, b"before")
    assert e2e.portal is not None
    assert e2e.portal.reject_access("alice", CIDR_RESOURCE) == 1
    time.sleep(2.0)
    assert e2e.udp_echo(RESOURCE, 7000, b"after", timeout=1.0) is None


@pytest.mark.parametrize("e2e", [4.0], indirect=True)
def test_expiry_cuts_traffic(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client, CIDR_RESOURCE)
    assert _echo_works(e2e, RESOURCE, 7000, b"before expiry")
    time.sleep(4.0 + 2.0)
    assert e2e.udp_echo(RESOURCE, 7000, b"after expiry", timeout=1.0) is None


def test_roaming_client_and_gateway_key_rotation(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client, CIDR_RESOURCE)
    assert _echo_works(e2e, RESOURCE, 7000, b"before roaming")
    # The client roams: new socket and port, same key; its next flow must work.
    mark = len(client.lines)
    e2e.client_command(client, "roam")
    _ready(client, CIDR_RESOURCE, timeout=45, after=mark)
    assert _echo_works(e2e, RESOURCE, 7000, b"after roaming", tries=20)
    # The gateway resets: new key at the portal, old PeerActors gone, a new flow works.
    assert e2e.portal is not None
    old_key = e2e.portal.gateways()[0].public_key
    old_actors = {c["actor"] for c in e2e.gateway_status()["clients"]}
    assert len(old_actors) == 1
    from actors.control import control_request

    control_request(e2e.control_socket, "reset")
    assert e2e.portal.wait_for(
        lambda p: p.gateways()[0].public_key != old_key and p.gateways()[0].open_sockets == 1,
        timeout=10,
    ), e2e.logs()
    status = e2e.wait_gateway_ready()
    assert status["resets"] == 1
    # The old PeerActor is gone from the gateway's registry (status lists live actors).
    assert {c["actor"] for c in status["clients"]}.isdisjoint(old_actors)
    mark = len(client.lines)
    e2e.client_command(client, "request " + str(CIDR_RESOURCE))
    _ready(client, CIDR_RESOURCE, timeout=45, after=mark)
    assert _echo_works(e2e, RESOURCE, 7000, b"after reset", tries=20)
    (fresh,) = e2e.gateway_status()["clients"]
    assert fresh["actor"] not in old_actors and fresh["path"] != "connecting"


def test_portal_restart_during_transfer(e2e: Stack) -> None:
    client = e2e.start_client(CIDR_RESOURCE)
    _ready(client, CIDR_RESOURCE)
    assert e2e.portal is not None
    attempts_before = e2e.portal.connection_attempts
    e2e.portal.stop()
    # The data plane does not depend on the portal: traffic keeps flowing.
    for i in range(5):
        assert _echo_works(e2e, RESOURCE, 7000, f"during outage {i}".encode())
        time.sleep(0.3)
    e2e.start_portal()
    assert e2e.portal.wait_for(
        lambda p: p.connection_attempts > attempts_before and p.gateways()[0].open_sockets == 1,
        timeout=30,
    ), e2e.logs()
    e2e.wait_gateway_ready()
    assert _echo_works(e2e, RESOURCE, 7000, b"after portal restart")
