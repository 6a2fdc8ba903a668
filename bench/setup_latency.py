"""Connection set-up: ``authorize_flow`` pushed to the gateway -> first packet at the resource.

Each flow is a new simulated client (a real :class:`ClientCore`, new key, direct path; see
:mod:`bench.simclient`), so every flow is a fresh ICE + WireGuard connection. The clock
starts just before the bench pushes ``authorize_flow`` through the dev portal and stops
when a UDP sink on the resource receives the datagram the client sends as soon as its
handshake completes. Flows run one after another, 50 ms apart.
"""

from __future__ import annotations

import time
from typing import Any

from bench.net import BenchNet
from bench.report import Results, percentile
from bench.simclient import SimClients, start_sink
from devstack.stack import CIDR_RESOURCE
from devstack.topology import ADDRESSES, RESOURCE

SINK_PORT = 7002


def cidr_resource(net: BenchNet) -> Any:
    assert net.stack.portal is not None
    return next(r for r in net.stack.portal.config.resources if r.id == CIDR_RESOURCE)


def run_setup(net: BenchNet, results: Results, *, flows: int, log: Any = print) -> None:
    portal = net.stack.portal
    assert portal is not None
    sink = start_sink(net.stack.topo.ns("resource"), (RESOURCE, SINK_PORT))
    sims = SimClients(portal, net.stack.topo.ns("client"), ADDRESSES["client"],
                      cidr_resource(net), (RESOURCE, SINK_PORT))
    sims.on_ready = lambda sim: sims.send_data(sim, f"flow {sim.index}".encode()) and None
    sims.start()
    try:
        setup_ms: list[float] = []
        handshake_ms: list[float] = []
        failures = 0
        for i in range(flows):
            sims.call(sims.add_client)
            deadline = time.monotonic() + 5.0
            while i not in sink.arrivals and time.monotonic() < deadline:
                time.sleep(0.002)
            sim = sims.sims[i] if i < len(sims.sims) else None
            if sim is None or i not in sink.arrivals or sim.authorized_at is None:
                failures += 1
                log(f"  flow {i}: no packet within 5 s ({sim.failed if sim else 'no client'})")
            else:
                setup_ms.append((sink.arrivals[i] - sim.authorized_at) * 1e3)
                if sim.ready_at is not None:
                    handshake_ms.append((sim.ready_at - sim.authorized_at) * 1e3)
            time.sleep(0.05)
        note = (f"{flows} fresh simulated clients, direct path; authorize_flow push -> "
                "first datagram at the resource")
        for q in (50, 99):
            results.add(f"setup.p{q}_ms", percentile(setup_ms, q) if setup_ms else None, "ms",
                        note)
            results.add(f"setup.handshake_p{q}_ms",
                        percentile(handshake_ms, q) if handshake_ms else None, "ms",
                        "authorize_flow push -> client's WireGuard handshake completed")
        results.add("setup.max_ms", max(setup_ms) if setup_ms else None, "ms")
        results.add("setup.failures", failures, "flows", f"of {flows}")
        if setup_ms:
            log(f"  set-up p50 {percentile(setup_ms, 50):.1f} ms, p99 "
                f"{percentile(setup_ms, 99):.1f} ms, max {max(setup_ms):.1f} ms, "
                f"{failures} failures of {flows}")
    finally:
        sims.stop()
        sink.stop()
