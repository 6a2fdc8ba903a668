"""iperf3 through the three paths (interleaved), and a UDP rate sweep through the gateway.

TCP: single stream and 4 streams, client -> resource (``up``) and resource -> client
(``down``, ``iperf3 -R``), for ``routed``, ``wireguard-go`` and ``gateway``; the order of
the configurations rotates from one repetition to the next. For the gateway the CPU used
by the gateway and by the dev client during each run is recorded as a share of one core.

UDP (gateway only): iperf3 ``-u -l 1252`` (1280-byte IP packets, the tunnel MTU) at
increasing offered packet rates; delivered rate and loss come from the iperf3 server's
report, and gateway CPU per delivered packet is the gateway's utime+stime
(``/proc/<pid>/stat``) over the run divided by the packets delivered.
"""

from __future__ import annotations

import time
from typing import Any

from bench.net import CONFIGS, BenchNet, proc_cpu_seconds, proc_cpu_split
from bench.report import Results

UDP_PAYLOAD = 1252  # + 8 UDP + 20 IPv4 = 1280, the TUN MTU of the gateway and the client
TCP_TESTS = (("tcp1_up", ()), ("tcp4_up", ("-P", "4")), ("tcp1_down", ("-R",)),
             ("tcp4_down", ("-R", "-P", "4")))


def _tcp_mbps(data: dict[str, Any]) -> float | None:
    try:
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (KeyError, TypeError):
        return None


def run_tcp(net: BenchNet, results: Results, *, repeat: int, seconds: float,
            log: Any = print) -> None:
    """All TCP tests, ``repeat`` times, configurations interleaved (rotated order)."""
    client_pid = net.client.popen.pid if net.client is not None else None
    for rep in range(repeat):
        order = CONFIGS[rep % 3:] + CONFIGS[:rep % 3]
        for config in order:
            net.use(config)
            for name, args in TCP_TESTS:
                gw0, t0 = net.gateway_cpu_seconds(), time.monotonic()
                cl0 = proc_cpu_seconds(client_pid) if client_pid else 0.0
                data = net.iperf3(*args, seconds=seconds)
                wall = time.monotonic() - t0
                mbps = _tcp_mbps(data)
                results.add(f"{config}.{name}_mbps", mbps, "Mbit/s",
                            f"iperf3 {' '.join(args) or '(1 stream)'} -t {seconds:g}, "
                            "receiver side")
                if config == "gateway":
                    results.add(f"gateway.{name}_gateway_cpu", (net.gateway_cpu_seconds() - gw0)
                                / wall, "cores", "gateway utime+stime / wall time of the run")
                    if client_pid:
                        results.add(f"gateway.{name}_devclient_cpu",
                                    (proc_cpu_seconds(client_pid) - cl0) / wall, "cores",
                                    "dev client utime+stime / wall time of the run")
                shown = f"FAILED {data.get('error')}" if mbps is None else f"{mbps:9.1f} Mbit/s"
                log(f"  rep {rep + 1} {config:<13} {name:<10} {shown}")
    net.use("gateway")


def run_udp(net: BenchNet, results: Results, *, rates: list[int], seconds: float,
            repeat: int, log: Any = print) -> None:
    """UDP through the gateway at each offered rate (packets/s), ``repeat`` times."""
    net.use("gateway")
    for rep in range(repeat):
        for pps in rates:
            bits = pps * UDP_PAYLOAD * 8
            user0, sys0 = proc_cpu_split(net.gateway_pid)
            data = net.iperf3("-u", "-l", str(UDP_PAYLOAD), "-b", str(bits), seconds=seconds)
            user1, sys1 = proc_cpu_split(net.gateway_pid)
            gw_cpu = user1 - user0 + sys1 - sys0
            try:
                end = data["end"]["sum"]
                sent = int(end["packets"])
                lost = int(end["lost_packets"])
                delivered = sent - lost
                secs = float(end["seconds"])
            except (KeyError, TypeError, ValueError):
                log(f"  rep {rep + 1} udp {pps} pps FAILED {data.get('error')}")
                continue
            key = f"gateway.udp_{pps // 1000}k"
            results.add(f"{key}.offered_pps", sent / secs, "packets/s",
                        f"iperf3 -u -l {UDP_PAYLOAD} -b {bits} -t {seconds:g} (sender)")
            results.add(f"{key}.delivered_pps", delivered / secs, "packets/s",
                        "iperf3 server: packets - lost_packets")
            results.add(f"{key}.loss_percent", 100 * lost / sent if sent else None, "%")
            us = gw_cpu / delivered * 1e6 if delivered else None
            results.add(f"{key}.gateway_cpu_us_per_packet", us, "us/packet",
                        "gateway utime+stime over the run / packets delivered (10 ms ticks)")
            if delivered:
                results.add(f"{key}.gateway_user_us_per_packet",
                            (user1 - user0) / delivered * 1e6, "us/packet", "utime only")
                results.add(f"{key}.gateway_sys_us_per_packet",
                            (sys1 - sys0) / delivered * 1e6, "us/packet",
                            "stime only (syscalls, and the kernel's forwarding of what the "
                            "gateway writes to its TUN)")
            log(f"  rep {rep + 1} udp offered {sent / secs:8.0f} pps delivered "
                f"{delivered / secs:8.0f} pps loss {100 * lost / max(sent, 1):5.1f} % "
                f"gateway {us or 0:6.1f} us/packet")
