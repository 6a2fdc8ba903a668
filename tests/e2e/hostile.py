"""What the e2e tests of hostile input share: a running stack, ``/readyz``, a UDP echo."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.stack import Stack, stack
from devstack.topology import RESOURCE
from tests.support.interop import require_bin, require_netns


@contextmanager
def running_stack(tmp_path: Path) -> Iterator[Stack]:
    """Portal, resource servers and a ready gateway; the logs are printed on failure."""
    require_netns()
    require_bin("turnserver", "coturn")
    require_bin("nft", "nftables")
    require_bin("curl", "curl")
    with stack(tmp_path) as built:
        built.start_portal()
        built.start_resource_servers()
        built.start_gateway()
        try:
            built.wait_gateway_ready()
            yield built
        except BaseException:
            print(built.logs())
            raise


def readyz(e2e: Stack) -> str:
    """The HTTP status of the gateway's ``/readyz``, asked from its namespace."""
    result = e2e.topo.run(
        "gateway", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
        "http://127.0.0.1:18080/readyz", check=False,
    )
    return result.stdout.strip()


def echo_works(e2e: Stack, payload: bytes, tries: int = 10) -> bool:
    """A UDP echo through the tunnel to the CIDR resource succeeds within ``tries``."""
    return any(e2e.udp_echo(RESOURCE, 7000, payload, timeout=1.0) == payload
               for _ in range(tries))
