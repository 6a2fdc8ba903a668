"""Scale: N simulated clients connected to one fresh gateway; memory, threads, CPU, rate.

For each N a new network and gateway are started (no dev client, no wireguard-go), then
N simulated clients (:mod:`bench.simclient`) connect with at most ``WINDOW`` flows
outstanding. ``authorize_flow`` throughput is N divided by the time from the first push
to the last client whose handshake completed. Then every client keeps its connection
alive as a real client would (ICE consent checks, WireGuard keepalives) and sends one
small datagram every ``TRICKLE_PERIOD`` seconds to a sink on the resource, while the
gateway's utime+stime, RSS and thread count are read from /proc over a fixed window.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from actors.control import control_request
from bench.net import bench_net, proc_cpu_seconds, proc_status
from bench.report import Results
from bench.setup_latency import SINK_PORT, cidr_resource
from bench.simclient import SimClients, raise_fd_limit, start_sink
from devstack.topology import ADDRESSES, RESOURCE

WINDOW = 64
TRICKLE_PERIOD = 10.0
TICK = 0.1


def run_scale(results: Results, *, sizes: list[int], window_s: float, connect_budget: float,
              log: Any = print) -> None:
    raise_fd_limit(max(sizes) + 2048)
    for n in sizes:
        with bench_net(devclient=False, wireguard=False) as net:
            _one(net, results, n, window_s, connect_budget, log)


def _one(net: Any, results: Results, n: int, window_s: float, budget: float, log: Any) -> None:
    portal = net.stack.portal
    pid = net.gateway_pid
    base = proc_status(pid)
    sink = start_sink(net.stack.topo.ns("resource"), (RESOURCE, SINK_PORT))
    sims = SimClients(portal, net.stack.topo.ns("client"), ADDRESSES["client"],
                      cidr_resource(net), (RESOURCE, SINK_PORT))
    sims.start()
    prefix = f"scale.n{n}"
    try:
        start = time.monotonic()
        cpu0 = proc_cpu_seconds(pid)
        added = 0
        while time.monotonic() - start < budget:
            ready = sum(1 for s in sims.sims if s.ready_at is not None)
            if ready >= n:
                break
            outstanding = added - ready - sum(1 for s in sims.sims if s.failed)
            for _ in range(min(WINDOW - outstanding, n - added)):
                sims.call(sims.add_client)
                added += 1
            time.sleep(0.01)
        connect_cpu = proc_cpu_seconds(pid) - cpu0
        readies = [s.ready_at for s in sims.sims if s.ready_at is not None]
        connected = len(readies)
        elapsed = (max(readies) - start) if readies else None
        rate = connected / elapsed if elapsed else None
        results.add(f"{prefix}.connected", connected, "clients",
                    f"of {n} within {budget:g} s")
        results.add(f"{prefix}.authorize_flow_per_s", rate, "flows/s",
                    f"connected clients / time to the last handshake, window {WINDOW}")
        results.add(f"{prefix}.connect_cpu_ms_per_flow",
                    connect_cpu / connected * 1e3 if connected else None, "ms",
                    "gateway utime+stime during the connect phase / clients connected")
        log(f"  N={n}: {connected} connected in {elapsed or 0:.1f} s "
            f"({rate or 0:.0f} flows/s)")
        # Steady state: keepalives plus a trickle of data.
        ticks = int(TRICKLE_PERIOD / TICK)
        tick = 0
        sent0, sink0 = sum(s.sent for s in sims.sims), sink.count
        t0, cpu0 = time.monotonic(), proc_cpu_seconds(pid)
        while time.monotonic() - t0 < window_s:
            due = [s for s in sims.sims if s.ready_at is not None and s.index % ticks == tick]
            sims.call(lambda due=due: [sims.send_data(s, b"trickle") for s in due])
            tick = (tick + 1) % ticks
            time.sleep(TICK)
        wall = time.monotonic() - t0
        cpu = (proc_cpu_seconds(pid) - cpu0) / wall
        status = proc_status(pid)
        gw_clients = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            gw_clients = len(control_request(net.stack.control_socket, "status")["clients"])
        results.add(f"{prefix}.rss_mib", status["rss_bytes"] / 2**20, "MiB",
                    f"gateway VmRSS after the window (idle gateway: "
                    f"{base['rss_bytes'] / 2**20:.1f} MiB)")
        results.add(f"{prefix}.threads", status["threads"], "threads",
                    f"gateway threads (idle gateway: {base['threads']})")
        results.add(f"{prefix}.idle_cpu_percent", cpu * 100, "% of a core",
                    f"gateway utime+stime over {window_s:g} s of keepalives + one datagram "
                    f"per client every {TRICKLE_PERIOD:g} s")
        results.add(f"{prefix}.gateway_clients", gw_clients, "clients", "gateway status")
        sent = sum(s.sent for s in sims.sims) - sent0
        results.add(f"{prefix}.trickle_delivered_percent",
                    100 * (sink.count - sink0) / sent if sent else None, "%",
                    "trickle datagrams received by the sink / sent")
        results.add(f"{prefix}.sim_stuck_deadlines", sims.stuck_deadlines, "count",
                    "bench-side: client cores whose deadline stayed in the past")
        log(f"  N={n}: RSS {status['rss_bytes'] / 2**20:.0f} MiB, {status['threads']} threads, "
            f"CPU {cpu * 100:.1f} % of a core, gateway reports {gw_clients} clients, "
            f"trickle {sink.count - sink0}/{sent}")
    finally:
        sims.stop()
        sink.stop()
