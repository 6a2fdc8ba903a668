"""End to end: one client exhausting its DNS-resource NAT ports neither stalls nor cuts
another client's traffic.

The gateway runs with an 8-port NAT range (``devstack/narrow_nat.py``, test only) so the
exhaustion takes a few flows; in production the range is 1-65535 and exhaustion is
detected the same way, without a search (``gateway/packet/nat.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import CIDR_RESOURCE, DNS_NAME, DNS_RESOURCE, Stack, stack
from devstack.topology import RESOURCE
from tests.support.interop import require_bin, require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]

NAT_PORTS = (40000, 40007)


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[Stack]:
    require_netns()
    require_bin("turnserver", "coturn")
    require_bin("nft", "nftables")
    require_bin("curl", "curl")
    with stack(tmp_path) as built:
        built.topo.set_hosts("gateway", {DNS_NAME: RESOURCE})
        built.start_portal()
        built.start_resource_servers()
        built.start_gateway(nat_ports=NAT_PORTS)
        try:
            built.wait_gateway_ready()
            yield built
        except BaseException:
            print(built.logs())
            raise


def _proxy_ip(client: Any) -> str:
    line = client.wait_line(lambda s: s.startswith("DNS ") and "status=Active" in s, 30)
    return next(ip for ip in line.split("proxy_ips=")[1].split()[0].split(",") if "." in ip)


def _echo(e2e: Stack, role: str, ip: str, payload: bytes, tries: int = 5) -> bool:
    return any(e2e.udp_echo(ip, 7000, payload, timeout=1.0, role=role) == payload
               for _ in range(tries))


def test_nat_exhaustion_of_one_client_leaves_another_client_alone(e2e: Stack) -> None:
    alice = e2e.start_client(CIDR_RESOURCE, DNS_RESOURCE,
                             extra=("--dns-domain", f"{DNS_RESOURCE}={DNS_NAME}"))
    bob = e2e.start_client(CIDR_RESOURCE, DNS_RESOURCE,
                           extra=("--dns-domain", f"{DNS_RESOURCE}={DNS_NAME}"), role="client2")
    alice_proxy, bob_proxy = _proxy_ip(alice), _proxy_ip(bob)
    # Each echo comes from a new source port: a new NAT session. Alice uses up the 8 ports
    # of the resource's address (retries of a lost datagram are new flows too).
    answered = sum(
        e2e.udp_echo(alice_proxy, 7000, b"alice flow %d" % n, timeout=1.0) is not None
        for n in range(12)
    )
    assert answered <= NAT_PORTS[1] - NAT_PORTS[0] + 1
    assert not _echo(e2e, "client", alice_proxy, b"alice one too many", tries=2)
    status = e2e.gateway_status()
    alice_drops = next(c["drops"] for c in status["clients"] if c["drops"].get("nat_exhausted"))
    assert alice_drops["nat_exhausted"] >= 3, (status, e2e.logs())
    # Bob's flows to the same resource, through his own proxy IP, are translated at once,
    # and both clients still reach the CIDR resource.
    for n in range(3):
        assert _echo(e2e, "client2", bob_proxy, b"bob flow %d" % n), e2e.logs()
    assert _echo(e2e, "client2", RESOURCE, b"bob direct")
    assert _echo(e2e, "client", RESOURCE, b"alice direct")
    status = e2e.gateway_status()
    exhausted = sorted(c["drops"].get("nat_exhausted", 0) for c in status["clients"])
    assert len(exhausted) == 2 and exhausted[0] == 0, status  # only alice hit it
    # /metrics (read without any session's lock) agrees with the sessions.
    metrics = e2e.topo.run("gateway", "curl", "-sS", "http://127.0.0.1:18080/metrics").stdout
    assert 'firezone_connections{path="direct"} 2' in metrics, metrics
    dropped = next(line for line in metrics.splitlines()
                   if 'reason="nat_exhausted"' in line)
    assert int(dropped.split()[-1]) == exhausted[1], (dropped, status)
    rx = next(line for line in metrics.splitlines() if line.startswith("firezone_rx_bytes"))
    assert int(rx.split()[-1]) >= sum(c["rx_bytes"] for c in status["clients"])
