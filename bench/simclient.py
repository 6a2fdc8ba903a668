"""Many simulated clients, each a real :class:`ClientCore` with its own socket.

Only the portal's client side is simulated: a client's ``create_flow`` becomes an
``authorize_flow`` pushed to the gateway through the dev portal (same payload shape as the
portal's), the gateway's ``flow_authorized`` (seen in the portal's event record) releases
``flow_created`` to the client, and ICE candidates are relayed both ways. Everything after
that — ICE checks and consent, the WireGuard handshake, keepalives, data — is the real
protocol over UDP between the client namespace and the gateway. The portal answers the
gateway's ``flow_authorized`` with ``invalid_ref`` (it did not create the flow); the gateway
only logs that.

:class:`SimEngine` is one thread's worth of clients: an epoll selector over the sockets, a
heap of core deadlines and a :class:`TrickleSchedule`. It leaves open how a push reaches
the gateway. :class:`SimClients` runs it on a thread of the bench process against the
in-process portal (set-up latency needs that); :mod:`bench.simworker` runs it in worker
processes for the scale bench.

The clients go idle as real ones do (rust/connlib/snownet/src/node.rs): ``devclient.core`` has no
idle mode, so the engine keeps a :class:`gateway.idle.IdleTracker` per client and switches the
client's ICE agent to the slow (60 s) check timings after 10 s without data. Without that every idle
client would still send a consent check every 1.5 s, which no real client does.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import random
import resource as rlimit
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devclient.core import ClientCore, Failed, Ready
from devportal.server import DevPortal, GatewayInfo
from devstack.netns import in_netns
from gateway.idle import IdleTracker
from gateway.packet.ip import build_udp
from gateway.portal.derive import derive_ice_credentials, generate_preshared_key
from gateway.resources import Resource, resource_to_json

log = logging.getLogger(__name__)

CLIENT_NET = ipaddress.IPv4Address("100.80.0.0")  # inside the gateway's 100.64.0.0/11
CLIENT_NET6 = ipaddress.IPv6Address("fd00:2021:1111::1:0")
#: The gateway's answers a simulated client needs (portal events on topic ``gateway``).
GATEWAY_ANSWERS = ("flow_authorized", "broadcast_ice_candidates")
#: A timer or trickle datagram handled this much after its time counts as late.
LATE = 1.0
#: Spreads the trickle phases of consecutive client indices evenly over the period.
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class Sim:
    """One simulated client and its timestamps (``time.monotonic``)."""

    index: int
    core: ClientCore
    sock: socket.socket
    local: tuple[str, int]
    client_id: uuid.UUID
    ipv4: str
    ipv6: str
    flow_ref: str = ""
    gateway_id: str = ""
    authorized_at: float | None = None
    ready_at: float | None = None
    failed: str | None = None
    scheduled: float = float("inf")
    scheduled_at: float = 0.0  # when ``scheduled`` was set: a deadline set in the past is no lag
    sent: int = 0
    pending: dict[str, Any] = field(default_factory=dict)
    idle: IdleTracker = field(default_factory=IdleTracker)


@dataclass
class Sink:
    """A UDP socket on the resource; records the arrival time of each ``flow N`` datagram."""

    sock: socket.socket
    arrivals: dict[int, float] = field(default_factory=dict)
    count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.count += 1
            if data.startswith(b"flow "):
                index = int(data[5:].split(b" ", 1)[0])
                self.arrivals.setdefault(index, now)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


def start_sink(resource_ns: str, address: tuple[str, int]) -> Sink:
    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(address)
        return sock

    sink = Sink(in_netns(resource_ns, bind))
    threading.Thread(target=sink.run, name="bench-sink", daemon=True).start()
    return sink


def raise_fd_limit(wanted: int) -> None:
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if soft < wanted:
        rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (max(wanted, soft), max(hard, wanted)))


def udp_socket(bind_ip: str) -> socket.socket:
    """A client's socket: non-blocking, on an ephemeral port (call inside the client ns)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((bind_ip, 0))
    return sock


def gateway_answers(portal: DevPortal, cursor: int) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """The gateway's answers recorded by the portal since ``cursor``, and the new cursor."""
    events = portal.events
    end = len(events)
    out = [(r.event, r.payload) for r in events[cursor:end]
           if r.direction == "in" and r.kind == "gateway" and r.event in GATEWAY_ANSWERS
           and isinstance(r.payload, dict)]
    return out, end


def trickles(index: int, percent: int) -> bool:
    """Whether client ``index`` is one of the ``percent`` % that send a trickle.

    Exactly ``percent`` of every 100 consecutive indices, spread out (integer arithmetic,
    so 10 % is every tenth index, not "about" a tenth)."""
    return (index * percent) // 100 != ((index + 1) * percent) // 100


def trickle_phase(index: int, period: float) -> float:
    """Offset of client ``index``'s sends within the period, evenly spread over indices."""
    return (index * _GOLDEN) % 1.0 * period


class TrickleSchedule:
    """Which client sends when, and how much was due even if the loop fell behind.

    Each entry sends every ``period`` seconds from its first time. ``due`` is computed from
    the clock alone, so a stalled loop shows as ``due > sent``; a loop that wakes up late
    sends once and skips the slots it missed (counted in ``missed``) instead of bursting.
    """

    def __init__(self) -> None:
        self.period = 0.0
        self._heap: list[tuple[float, int]] = []
        self._firsts: list[float] = []
        self._closed_due = 0
        self.late = 0
        self.missed = 0

    def start(self, entries: list[tuple[int, float]], period: float, now: float) -> None:
        """``entries``: (slot, first send time); replaces the running schedule, if any."""
        if period <= 0:
            raise ValueError("period must be positive")
        self.stop(now)
        self.period = period
        self._heap = [(first, slot) for slot, first in entries]
        heapq.heapify(self._heap)
        self._firsts = [first for _, first in entries]

    def stop(self, now: float) -> None:
        self._closed_due = self.due(now)
        self._heap, self._firsts = [], []

    def due(self, now: float) -> int:
        """Sends due up to ``now`` since the first schedule started (cumulative)."""
        period = self.period
        return self._closed_due + sum(int((now - f) // period) + 1 for f in self._firsts
                                      if now >= f)

    def size(self) -> int:
        """Clients in the running schedule."""
        return len(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def take(self, now: float) -> list[int]:
        """Slots to send now; each is rescheduled at its next slot after ``now``."""
        out: list[int] = []
        heap, period = self._heap, self.period
        while heap and heap[0][0] <= now:
            at, slot = heapq.heappop(heap)
            if now - at > LATE:
                self.late += 1
            skipped = int((now - at) // period)
            self.missed += skipped
            heapq.heappush(heap, (at + (skipped + 1) * period, slot))
            out.append(slot)
        return out


class SimEngine:
    """Simulated clients driven by one thread; subclasses say how pushes reach the gateway.

    Subclasses implement :meth:`_push` (hand an event to the portal for the gateway) and
    :meth:`_gateway_identity`, and call :meth:`handle_gateway_answer` with the gateway's
    answers. ``first_index`` lets several engines share one index space (tunnel addresses).
    """

    def __init__(self, resource: Resource, sink_address: tuple[str, int],
                 make_socket: Callable[[], socket.socket], *, seed: int = 7,
                 first_index: int = 0) -> None:
        self.resource = resource
        self.resource_id = str(resource.id)
        self.sink_address = sink_address
        self._make_socket = make_socket
        self.rng = random.Random(seed)
        self.first_index = first_index
        self.sims: list[Sim] = []
        self._by_ref: dict[str, Sim] = {}
        self._by_id: dict[str, Sim] = {}
        self._sel = selectors.DefaultSelector()
        self._heap: list[tuple[float, int]] = []  # (deadline, position in self.sims)
        self.trickle = TrickleSchedule()
        self.trickle_sent = 0
        self.trickle_unsent = 0  # due but the client had no connection
        self.on_ready: Callable[[Sim], object] | None = None
        self.on_failed: Callable[[Sim], object] | None = None
        self.errors = 0
        self.stuck_deadlines = 0  # handle_timeout left the deadline in the past
        self.ready_count = 0
        self.failed_count = 0  # failed before they were ever ready
        # Loop health: how late timers ran, counted from their deadline or, for a deadline
        # already past when it was set (a connection leaving idle mode), from that moment.
        self.max_lag = 0.0  # worst since the last take_max_lag()
        self.late_timers = 0  # more than LATE

    # ------------------------------------------------------------------ public

    def add_client(self) -> Sim:
        """Create a client and request the resource; call on the engine's thread."""
        index = self.first_index + len(self.sims)
        now, wall = time.monotonic(), time.time()
        core = ClientCore(rng=self.rng, now=now, unix_now=wall)
        sock = self._make_socket()
        local = sock.getsockname()
        sim = Sim(index, core, sock, (local[0], local[1]), uuid.UUID(int=self.rng.getrandbits(128)),
                  str(CLIENT_NET + index + 1), str(CLIENT_NET6 + index + 1))
        self.sims.append(sim)
        self._by_id[str(sim.client_id)] = sim
        self._sel.register(sock, selectors.EVENT_READ, sim)
        core.set_local_address(sim.local)
        core.handle_portal_message("init", {
            "interface": {"ipv4": sim.ipv4, "ipv6": sim.ipv6},
            "resources": [resource_to_json(self.resource)],
            "relays": [],
        }, now, wall)
        core.request(self.resource_id, now)
        self._flush(sim, now)
        return sim

    def send_data(self, sim: Sim, payload: bytes) -> bool:
        """Send one UDP datagram from ``sim`` to the sink through the tunnel."""
        now = time.monotonic()
        if sim.idle.note_data(now):
            self._set_idle(sim, False, now)
        packet = build_udp(sim.ipv4, self.sink_address[0], 40000 + sim.index % 20000,
                           self.sink_address[1], payload)
        ok = sim.core.inject(self.resource_id, packet, now, time.time())
        if ok:
            sim.sent += 1
            self._flush(sim, time.monotonic())
        return ok

    def start_trickle(self, percent: int, period: float) -> int:
        """``percent`` % of the ready clients send one datagram every ``period`` s.

        Replaces a running trickle; returns how many clients trickle."""
        now = time.monotonic()
        entries = [(pos, now + trickle_phase(sim.index, period))
                   for pos, sim in enumerate(self.sims)
                   if sim.ready_at is not None and trickles(sim.index, percent)]
        self.trickle.start(entries, period, now)
        return len(entries)

    def stop_trickle(self) -> None:
        self.trickle.stop(time.monotonic())

    def take_max_lag(self) -> float:
        """The worst timer lateness (s) since the previous call."""
        lag, self.max_lag = self.max_lag, 0.0
        return lag

    def idle_clients(self) -> int:
        return sum(1 for sim in self.sims if sim.idle.idle)

    def register(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Watch another readable fd (a worker's command pipe) in the same selector."""
        self._sel.register(fileobj, selectors.EVENT_READ, callback)

    def run_once(self, max_wait: float) -> None:
        """Wait for a datagram or the next deadline (at most ``max_wait`` s), handle both."""
        wake = min((t for t in (self._heap[0][0] if self._heap else None,
                                self.trickle.next_time()) if t is not None), default=None)
        timeout = max_wait if wake is None else min(max_wait, max(0.0, wake - time.monotonic()))
        for key, _ in self._sel.select(timeout):
            if isinstance(key.data, Sim):
                self._read(key.data)
            else:
                key.data()
        self._timers()
        self._send_trickle()

    def close(self) -> None:
        for sim in self.sims:
            sim.sock.close()
        self._sel.close()

    def handle_gateway_answer(self, event: str, payload: dict[str, Any]) -> None:
        """The gateway's ``flow_authorized`` or ``broadcast_ice_candidates``, as recorded."""
        if event == "flow_authorized":
            sim = self._by_ref.get(str(payload.get("ref")))
            if sim is not None:
                now = time.monotonic()
                sim.core.handle_portal_message("flow_created", sim.pending, now, time.time())
                self._flush(sim, now)
        elif event == "broadcast_ice_candidates":
            gateway_id = str(self._gateway_identity()[0])
            for cid in payload.get("client_ids", []):
                sim = self._by_id.get(str(cid))
                if sim is not None:
                    now = time.monotonic()
                    sim.core.handle_portal_message("ice_candidates", {
                        "gateway_id": gateway_id, "candidates": payload.get("candidates", []),
                    }, now, time.time())
                    self._flush(sim, now)

    # ------------------------------------------------------------------ for subclasses

    def _push(self, event: str, payload: dict[str, Any]) -> None:
        """Have the portal push ``event`` to the gateway."""
        raise NotImplementedError

    def _gateway_identity(self) -> tuple[uuid.UUID, str]:
        """The gateway's id and public key (as the portal knows them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ internals

    def _read(self, sim: Sim) -> None:
        for _ in range(32):
            try:
                data, src = sim.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            sim.core.handle_datagram(sim.local, (src[0], src[1]), data, time.monotonic(),
                                     time.time())
        self._flush(sim, time.monotonic())

    def _timers(self) -> None:
        now = time.monotonic()
        due: list[Sim] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, pos = heapq.heappop(self._heap)
            sim = self.sims[pos]
            if deadline == sim.scheduled:  # else a stale entry
                sim.scheduled = float("inf")
                due.append(sim)
                lag = now - max(deadline, sim.scheduled_at)
                if lag > self.max_lag:
                    self.max_lag = lag
                if lag > LATE:
                    self.late_timers += 1
        for sim in due:  # one pass: a deadline that stays in the past must not spin here
            sim.core.handle_timeout(now, time.time())
            if sim.idle.handle_timeout(now):
                self._set_idle(sim, True, now)
            self._flush(sim, now, floor=now + 0.001)

    def _send_trickle(self) -> None:
        for pos in self.trickle.take(time.monotonic()):
            if self.send_data(self.sims[pos], b"trickle"):
                self.trickle_sent += 1
            else:
                self.trickle_unsent += 1

    def _set_idle(self, sim: Sim, idle: bool, now: float) -> None:
        """Slow (idle) or default ICE check timings on the client's connection."""
        conn = sim.core.connection(sim.gateway_id)
        if conn is not None:
            conn.agent.set_idle(idle, now)

    def _send(self, sim: Sim) -> None:
        while (tx := sim.core.poll_transmit()) is not None:
            try:
                sim.sock.sendto(tx.payload, tx.dst)
            except OSError:
                self.errors += 1

    def _flush(self, sim: Sim, now: float, floor: float = 0.0) -> None:
        core = sim.core
        self._send(sim)
        while core.poll_tun() is not None:
            if sim.idle.note_data(now):
                self._set_idle(sim, False, now)
        while (push := core.poll_portal()) is not None:
            self._client_push(sim, *push)
        while (event := core.poll_event()) is not None:
            if isinstance(event, Ready) and sim.ready_at is None:
                sim.ready_at = time.monotonic()
                self.ready_count += 1
                sim.idle.start(sim.ready_at)
                if self.on_ready is not None:
                    self.on_ready(sim)
            elif isinstance(event, Failed):
                if sim.failed is None and sim.ready_at is None:
                    self.failed_count += 1
                sim.failed = event.line()
                if self.on_failed is not None:
                    self.on_failed(sim)
        self._send(sim)  # on_ready may have sent data
        deadline = core.poll_timeout()
        idle_at = sim.idle.poll_timeout()
        if idle_at is not None and (deadline is None or idle_at < deadline):
            deadline = idle_at
        if deadline is not None and deadline < floor:
            self.stuck_deadlines += 1
            deadline = floor
        if deadline is not None and deadline < sim.scheduled:
            sim.scheduled, sim.scheduled_at = deadline, now
            heapq.heappush(self._heap, (deadline, sim.index - self.first_index))

    def _client_push(self, sim: Sim, event: str, payload: dict[str, Any]) -> None:
        if event == "create_flow":
            gateway_id, gateway_key = self._gateway_identity()
            creds = derive_ice_credentials(sim.client_id, sim.core.public_key, gateway_id,
                                           gateway_key)
            psk = generate_preshared_key(self.rng)
            sim.flow_ref = f"bench.{sim.index}.{self.rng.getrandbits(64):016x}"
            sim.gateway_id = str(gateway_id)
            self._by_ref[sim.flow_ref] = sim
            sim.pending = {
                "resource_id": self.resource_id, "gateway_id": str(gateway_id),
                "gateway_public_key": gateway_key, "gateway_ipv4": None,
                "gateway_ipv6": None, "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(), "preshared_key": psk,
            }
            sim.authorized_at = time.monotonic()
            self._push("authorize_flow", {
                "ref": sim.flow_ref,
                "flow_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                "actor": {"id": str(sim.client_id)},
                "resource": resource_to_json(self.resource),
                "expires_at": None,
                "client": {"id": str(sim.client_id), "public_key": sim.core.public_key,
                           "preshared_key": psk, "ipv4": sim.ipv4, "ipv6": sim.ipv6},
                "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(),
            })
        elif event == "broadcast_ice_candidates":
            self._push("ice_candidates", {
                "client_id": str(sim.client_id), "candidates": payload["candidates"],
            })


class SimClients(SimEngine):
    """Runs simulated clients on a thread of this process against the in-process portal;
    other threads call :meth:`call` to reach them."""

    def __init__(self, portal: DevPortal, client_ns: str, bind_ip: str, resource: Resource,
                 sink_address: tuple[str, int], *, seed: int = 7) -> None:
        super().__init__(resource, sink_address,
                         lambda: in_netns(client_ns, lambda: udp_socket(bind_ip)), seed=seed)
        self.portal = portal
        self.client_ns = client_ns
        self.bind_ip = bind_ip
        self._cursor = len(portal.events)
        self._calls: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-simclients", daemon=True)
        self._gateway: GatewayInfo | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.close()

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the client thread (between two iterations)."""
        with self._lock:
            self._calls.append(fn)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                try:
                    fn()
                except Exception:  # a benchmark bug must not kill the loop silently
                    log.exception("simclients call failed")
                    self.errors += 1
            self.run_once(0.005)  # the portal's record is polled, so wake up often
            answers, self._cursor = gateway_answers(self.portal, self._cursor)
            for event, payload in answers:
                self.handle_gateway_answer(event, payload)

    def _gateway_info(self) -> GatewayInfo:
        if self._gateway is None:
            self._gateway = self.portal.gateways()[-1]
        return self._gateway

    def _gateway_identity(self) -> tuple[uuid.UUID, str]:
        gw = self._gateway_info()
        return gw.id, gw.public_key

    def _push(self, event: str, payload: dict[str, Any]) -> None:
        self.portal.push_to_gateway(event, payload, self._gateway_info().id)
