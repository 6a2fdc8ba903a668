"""Scale: N simulated clients connected to one fresh gateway; memory, threads, CPU, rate.

For each N a new network and gateway are started (no dev client, no wireguard-go), then N
simulated clients connect, spread over worker processes (:mod:`bench.simworker`) so the
client side is not the bottleneck, with at most ``WINDOW`` flows outstanding in total.
``authorize_flow`` throughput is the clients connected divided by the time from the first
push to the last completed handshake.

Then three steady states, one after the other, each measured over the same window after a
warm-up long enough for both ends to enter (or leave) idle mode (rust/connlib/snownet/src/node.rs):

* ``idle``: no client sends data; every connection idles (the goal's "idle CPU");
* ``all_trickle``: every client sends one small datagram every ``TRICKLE_PERIOD`` s;
* the main figures (no infix): ``MAIN_PERCENT`` % of the clients trickle, the others are
  idle and only keep their connection alive as a real client would (ICE checks every 60 s
  once idle, WireGuard persistent keepalive every 25 s).

Per window: the gateway's utime+stime (% of one core), each worker's and the bench
process's CPU (to show the client side was not saturated), trickle datagrams due (from the
clock), sent and arrived at the sink, the clients' worst timer lateness, connections that
failed, and UDP receive-buffer overflows in the gateway's and the clients' namespace (which
side's receiver fell behind). A stalled client loop shows as ``due > sent`` and a large
lag. After the main window the gateway's VmRSS, threads and the clients in its ``status``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from actors.control import ControlError, control_request
from bench.blast import counts
from bench.net import BenchNet, bench_net, proc_cpu_seconds, proc_status
from bench.report import Results, percentile
from bench.setup_latency import SINK_PORT, cidr_resource
from bench.simclient import Sink, raise_fd_limit, start_sink
from bench.simworker import SimWorkers, Stats
from devstack.topology import ADDRESSES, RESOURCE
from gateway.idle import IDLE_AFTER

WINDOW = 64
#: New flows per second at most, in total. Each is one handshake initiation, and the
#: node-wide limiter (as in rust/connlib/snownet/src/node.rs) takes 100 handshake messages
#: per second: above it clients wait for a cookie and retry 5 s later, so a faster burst only
#: measures that.
CONNECT_RATE = 90.0
TRICKLE_PERIOD = 10.0
#: The main steady state: this share of the clients trickles, the rest is idle.
MAIN_PERCENT = 10
#: Before a window: every trickling client has sent once, the others have gone idle.
WARMUP = max(IDLE_AFTER, TRICKLE_PERIOD) + 3.0
WORKERS = 2
PROGRESS_EVERY = 30.0


@dataclass(frozen=True)
class Trickle:
    infix: str  # in the figure names; "" for the main steady state
    percent: int
    note: str


#: Quietest first: ``idle`` is the goal's "idle CPU" (every client idle, keepalives and
#: ICE consent only); the all-clients trickle can overload the gateway (N = 5000) so that
#: clients lose their connections, which would spoil a window after it.
TRICKLES = (
    Trickle("idle.", 0, "no trickle: every client idle (keepalives and ICE consent only)"),
    Trickle("", MAIN_PERCENT, f"trickle: {MAIN_PERCENT} % of the clients, one datagram every "
            f"{TRICKLE_PERIOD:g} s; the others idle (keepalives only)"),
    Trickle("all_trickle.", 100, f"trickle: every client, one datagram every "
            f"{TRICKLE_PERIOD:g} s"),
)


@dataclass(frozen=True)
class _Cpu:
    """CPU seconds so far of the gateway, each worker and the bench process."""

    at: float
    gateway: float
    workers: list[float]
    bench: float

    @classmethod
    def now(cls, pid: int, sims: SimWorkers) -> _Cpu:
        return cls(time.monotonic(), proc_cpu_seconds(pid), sims.cpu_seconds(),
                   proc_cpu_seconds(os.getpid()))

    def since(self, earlier: _Cpu) -> tuple[float, list[float], float]:
        """% of one core over the interval: gateway, each worker, bench process."""
        wall = self.at - earlier.at
        return (100 * (self.gateway - earlier.gateway) / wall,
                [100 * (a - b) / wall for a, b in zip(self.workers, earlier.workers,
                                                      strict=True)],
                100 * (self.bench - earlier.bench) / wall)


def run_scale(results: Results, *, sizes: list[int], window_s: float, connect_budget: float,
              workers: int = WORKERS, log: Any = print) -> None:
    raise_fd_limit(max(sizes) + 2048)  # the gateway inherits it
    for n in sizes:
        with bench_net(devclient=False, wireguard=False) as net:
            _one(net, results, n, window_s, connect_budget, workers, log)


def _one(net: BenchNet, results: Results, n: int, window_s: float, budget: float,
         workers: int, log: Any) -> None:
    portal = net.stack.portal
    assert portal is not None
    pid = net.gateway_pid
    base = proc_status(pid)
    sink = start_sink(net.stack.topo.ns("resource"), (RESOURCE, SINK_PORT))
    sims: SimWorkers | None = None
    try:
        sims = SimWorkers(portal, net.stack.topo.ns("client"), ADDRESSES["client"],
                          cidr_resource(net), (RESOURCE, SINK_PORT), clients=n,
                          workers=workers)
        sims.start()
        log(f"  N={n}: gateway pid {pid}, {len(sims.pids)} client workers {sims.pids}")
        prefix = f"scale.n{n}"
        _connect(net, sims, n, budget, results, prefix, log)
        last: list[Stats] = []
        for trickle in TRICKLES:
            last = _steady(net, sims, sink, trickle, window_s, results, prefix, log)
            if not trickle.infix:  # the main steady state: the gateway's state after it
                _gateway_state(net, base, results, prefix, log)
        results.add(f"{prefix}.dropped_total", sum(sims.dropped.values()), "clients",
                    "connected clients that failed later (whole run)")
        results.add(f"{prefix}.sim_stuck_deadlines", _sum(last, "stuck_deadlines"), "count",
                    "client side: client cores whose deadline stayed in the past (whole run)")
        results.add(f"{prefix}.sim_late_timers", _sum(last, "late_timers"), "count",
                    "client side: timers handled more than 1 s late (whole run)")
        if sims.dropped:
            log(f"  N={n}: dropped after connecting: {dict(sims.dropped.most_common(5))}")
    finally:
        if sims is not None:
            sims.stop()
        sink.stop()


def _connect(net: BenchNet, sims: SimWorkers, n: int, budget: float, results: Results,
             prefix: str, log: Any) -> None:
    cpu0 = _Cpu.now(net.gateway_pid, sims)
    start = cpu0.at
    sims.connect(WINDOW, CONNECT_RATE)
    report = start + PROGRESS_EVERY
    while time.monotonic() - start < budget and sims.ready + sims.failed < n:
        if sims.alive() < len(sims.pids):
            raise RuntimeError("a simulated-client worker died (see its log above)")
        time.sleep(0.1)
        if time.monotonic() >= report:
            report += PROGRESS_EVERY
            gw, wk, _ = _Cpu.now(net.gateway_pid, sims).since(cpu0)
            log(f"  N={n}: {sims.ready} ready, {sims.failed} failed after "
                f"{time.monotonic() - start:.0f} s (gateway {gw:.0f} %, workers "
                f"{'/'.join(f'{w:.0f}' for w in wk)} % of a core)")
    cpu1 = _Cpu.now(net.gateway_pid, sims)
    gw, wk, bench = cpu1.since(cpu0)
    records = list(sims.records.values())
    readies = [r.ready_at for r in records if r.ready_at is not None]
    handshakes = [(r.ready_at - r.authorized_at) * 1e3 for r in records
                  if r.ready_at is not None and r.authorized_at is not None]
    connected = len(readies)
    elapsed = (max(readies) - start) if readies else None
    rate = connected / elapsed if elapsed else None
    results.add(f"{prefix}.connected", connected, "clients", f"of {n} within {budget:g} s")
    results.add(f"{prefix}.connect_s", elapsed, "s", "first push -> last completed handshake")
    results.add(f"{prefix}.connect_failed", sims.failed, "clients",
                "clients that reported a failure before being ready")
    results.add(f"{prefix}.authorize_flow_per_s", rate, "flows/s",
                f"connected clients / time to the last handshake, window {WINDOW}, "
                f"paced at <= {CONNECT_RATE:g} new flows/s (the handshake limit is 100/s)")
    results.add(f"{prefix}.connect_cpu_ms_per_flow",
                (cpu1.gateway - cpu0.gateway) / connected * 1e3 if connected else None, "ms",
                "gateway utime+stime during the connect phase / clients connected")
    results.add(f"{prefix}.connect_handshake_p50_ms",
                percentile(handshakes, 50) if handshakes else None, "ms",
                "authorize_flow push -> handshake completed, under the connect load")
    results.add(f"{prefix}.connect_gateway_cpu_percent", gw, "% of a core",
                "gateway during the connect phase")
    results.add(f"{prefix}.connect_workers_cpu_percent", max(wk, default=None), "% of a core",
                f"busiest client worker during the connect phase (all: "
                f"{', '.join(f'{w:.0f}' for w in wk)}; bench process {bench:.0f})")
    log(f"  N={n}: {connected} connected, {sims.failed} failed, in {elapsed or 0:.1f} s "
        f"({rate or 0:.1f} flows/s); CPU during connect: gateway {gw:.0f} %, workers "
        f"{'/'.join(f'{w:.0f}' for w in wk)} %, bench {bench:.0f} % of a core")


def _sum(stats: list[Stats], name: str) -> int:
    return sum(int(getattr(s, name)) for s in stats)


def _steady(net: BenchNet, sims: SimWorkers, sink: Sink, trickle: Trickle, window_s: float,
            results: Results, prefix: str, log: Any) -> list[Stats]:
    """One steady-state window; returns the workers' stats at its end."""
    name = f"{prefix}.{trickle.infix}"
    sims.trickle(trickle.percent, TRICKLE_PERIOD)
    time.sleep(WARMUP)
    before, arrived0, cpu0 = sims.stats(), sink.count, _Cpu.now(net.gateway_pid, sims)
    dropped0 = sum(sims.dropped.values())
    rcvbuf0 = _rcvbuf_errors(net)
    log(f"  {name}steady window ({trickle.note}): {window_s:g} s from now")
    time.sleep(window_s)
    after, arrived1, cpu1 = sims.stats(), sink.count, _Cpu.now(net.gateway_pid, sims)
    rcvbuf = {role: n - rcvbuf0[role] for role, n in _rcvbuf_errors(net).items()}
    gw, wk, bench = cpu1.since(cpu0)
    complete = len(before) == len(after) == len(sims.pids)
    if not complete:
        log(f"  {name}: only {len(before)}/{len(after)} of {len(sims.pids)} workers answered "
            f"(stalled?); trickle figures left out")

    def delta(field: str) -> int | None:
        return _sum(after, field) - _sum(before, field) if complete else None

    due, sent, arrived = delta("trickle_due"), delta("trickle_sent"), arrived1 - arrived0
    lag = max((s.max_lag_s for s in after), default=None)
    dropped = sum(sims.dropped.values())
    trickling = _sum(after, "trickling")
    note = f"{trickle.note}; {window_s:g} s window after {WARMUP:g} s warm-up"
    results.add(f"{name}steady_cpu_percent", gw, "% of a core",
                f"gateway utime+stime; {note}")
    results.add(f"{name}steady_workers_cpu_percent", max(wk, default=None), "% of a core",
                f"busiest client worker (all: {', '.join(f'{w:.1f}' for w in wk)}); {note}")
    results.add(f"{name}steady_bench_cpu_percent", bench, "% of a core",
                "bench process (dev portal, relay to the workers, sink)")
    results.add(f"{name}trickle_due", due, "datagrams",
                f"{trickling} trickling clients; due by the clock in the window")
    results.add(f"{name}trickle_sent", sent, "datagrams", "sent by the clients")
    results.add(f"{name}trickle_arrived", arrived, "datagrams", "received by the sink")
    results.add(f"{name}sim_max_lag_ms", None if lag is None else lag * 1e3, "ms",
                "client side: worst lateness of a client timer in the window (stall check)")
    results.add(f"{name}sim_idle_clients", _sum(after, "idle"), "clients",
                "client side: connections in idle mode at the end of the window")
    results.add(f"{name}window_dropped", dropped - dropped0, "clients",
                "connected clients that failed during the window (ICE or WireGuard)")
    for role, n in rcvbuf.items():
        results.add(f"{name}{role}_rcvbuf_drops", n, "datagrams",
                    f"kernel: UDP receive buffer overflows in the {role} namespace "
                    "(RcvbufErrors; its receiver fell behind)")
    log(f"  {name}steady: gateway {gw:.1f} %, workers {'/'.join(f'{w:.1f}' for w in wk)} %, "
        f"bench {bench:.1f} % of a core; trickle due/sent/arrived {due}/{sent}/{arrived} "
        f"(no connection {delta('trickle_unsent')}, skipped late {delta('trickle_missed')}); "
        f"client lag max {0 if lag is None else lag * 1e3:.0f} ms; "
        f"{_sum(after, 'idle')} clients idle; {dropped} dropped so far; UDP receive buffer "
        f"overflows {rcvbuf}")
    return after


def _rcvbuf_errors(net: BenchNet) -> dict[str, int]:
    """UDP receive buffer overflows so far in the gateway's and the clients' namespace."""
    return {role: counts(net, role).udp.get("RcvbufErrors", 0) for role in ("gateway", "client")}


def _gateway_state(net: BenchNet, base: dict[str, int], results: Results, prefix: str,
                   log: Any) -> None:
    status = proc_status(net.gateway_pid)
    clients: list[dict[str, Any]] | None = None
    collector: dict[str, Any] | None = None
    try:  # the gateway asks every PeerActor in turn: slow with thousands
        answer = control_request(net.stack.control_socket, "status", timeout=120)
        clients = answer.get("clients")
        collector = answer.get("gc")
        if clients is None:
            log(f"  status failed: {answer.get('error', answer)}")
    except ControlError as exc:
        log(f"  status failed: {exc}")
    idle = None if clients is None else sum(1 for c in clients if c.get("idle"))
    results.add(f"{prefix}.rss_mib", status["rss_bytes"] / 2**20, "MiB",
                f"gateway VmRSS after the main window (idle gateway: "
                f"{base['rss_bytes'] / 2**20:.1f} MiB)")
    results.add(f"{prefix}.threads", status["threads"], "threads",
                f"gateway threads (idle gateway: {base['threads']})")
    results.add(f"{prefix}.gateway_clients", None if clients is None else len(clients),
                "clients", "gateway status")
    results.add(f"{prefix}.gateway_idle_clients", idle, "clients",
                "gateway status: connections in idle mode (main steady state)")
    log(f"  RSS {status['rss_bytes'] / 2**20:.0f} MiB, {status['threads']} threads, gateway "
        f"reports {None if clients is None else len(clients)} clients ({idle} idle)")
    if collector is not None:
        results.add(f"{prefix}.gc_full_collections", collector["collections"][2], "count",
                    "gateway status: full garbage collections since start (connect included)")
        results.add(f"{prefix}.gc_longest_full_pause_ms", collector["longest_pause_ms"][2], "ms",
                    "gateway status: the longest full collection; every thread waits for it")
        results.add(f"{prefix}.gc_longest_young_pause_ms", max(collector["longest_pause_ms"][:2]),
                    "ms", "gateway status: the longest generation 0/1 collection")
        log(f"  garbage collector: {collector['collections'][2]} full collections, longest "
            f"{collector['longest_pause_ms'][2]:.0f} ms (young: "
            f"{max(collector['longest_pause_ms'][:2]):.0f} ms), "
            f"{collector['frozen_objects']} objects frozen")
