"""Reset: ``reset`` on the control socket -> the gateway rejoined the portal with a new key.

The dev portal runs in the bench process, so its event record and the bench share one
monotonic clock. ``rejoined`` is the portal receiving ``phx_join`` on a socket whose
public key differs from the key before the reset. ``client_recovered`` additionally times
how long the dev client (``python -m devclient``, TUN) takes until a UDP echo through the
gateway works again (probed every 100 ms, up to 30 s).
"""

from __future__ import annotations

import time
from typing import Any

from actors.control import control_request
from bench.net import BenchNet
from bench.report import Results
from devstack.topology import RESOURCE


def _echo_ok(net: BenchNet, tag: str) -> bool:
    return net.stack.udp_echo(RESOURCE, 7000, tag.encode(), timeout=0.1) is not None


def wait_client_path(net: BenchNet, timeout: float = 30.0) -> float | None:
    """Seconds until a UDP echo through the dev client's tunnel works, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _echo_ok(net, "probe"):
            return time.monotonic() - start
    return None


def run_reset(net: BenchNet, results: Results, *, repeat: int, log: Any = print) -> None:
    portal = net.stack.portal
    assert portal is not None
    net.use("gateway")
    for rep in range(repeat):
        wait_client_path(net)
        old = portal.gateways()[-1].public_key
        cursor = len(portal.events)
        start = time.monotonic()
        control_request(net.stack.control_socket, "reset")
        joined_at = None
        deadline = start + 10.0
        while joined_at is None and time.monotonic() < deadline:
            record = portal.wait_for_event("in", "phx_join", after=cursor, timeout=0.5)
            if record is None or record.kind != "gateway":
                cursor = len(portal.events) if record is None else portal.events.index(record) + 1
                continue
            if portal.gateways()[-1].public_key != old:
                joined_at = record.at
            cursor = portal.events.index(record) + 1
        rejoin = None if joined_at is None else (joined_at - start) * 1e3
        results.add("reset.rejoined_ms", rejoin, "ms",
                    "control-socket reset -> portal receives phx_join with the new key")
        back = wait_client_path(net)
        recovered = None if back is None else time.monotonic() - start
        results.add("reset.client_recovered_s", recovered, "s",
                    "reset -> UDP echo through the dev client works again (100 ms probes)")
        log(f"  reset {rep + 1}: rejoined in "
            f"{'-' if rejoin is None else f'{rejoin:.1f} ms'}, client path back after "
            f"{'-' if recovered is None else f'{recovered:.2f} s'}")
