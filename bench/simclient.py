"""Many simulated clients in one process, each a real :class:`ClientCore` with its own socket.

Only the portal's client side is simulated. :class:`SimClients` plays it: a client's
``create_flow`` becomes an ``authorize_flow`` pushed to the gateway through the dev
portal's ``push_to_gateway`` (same payload shape as the portal's), the gateway's
``flow_authorized`` (seen in the portal's event record) releases ``flow_created`` to the
client, and ICE candidates are relayed both ways. Everything after that — ICE checks and
consent, the WireGuard handshake, keepalives, data — is the real protocol over UDP between
the client namespace and the gateway. The portal answers the gateway's ``flow_authorized``
with ``invalid_ref`` (it did not create the flow); the gateway only logs that.

One thread runs every core: an epoll selector over the sockets, a heap of core deadlines,
and a 5 ms poll of the portal's event record.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
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

from devclient.core import ClientCore, Ready
from devportal.server import DevPortal
from devstack.netns import in_netns
from gateway.packet.ip import build_udp
from gateway.portal.derive import derive_ice_credentials, generate_preshared_key
from gateway.resources import Resource, resource_to_json

log = logging.getLogger(__name__)

CLIENT_NET = ipaddress.IPv4Address("100.80.0.0")  # inside the gateway's 100.64.0.0/11
CLIENT_NET6 = ipaddress.IPv6Address("fd00:2021:1111::1:0")


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
    authorized_at: float | None = None
    ready_at: float | None = None
    failed: str | None = None
    scheduled: float = float("inf")
    sent: int = 0
    pending: dict[str, Any] = field(default_factory=dict)


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


class SimClients:
    """Runs simulated clients on one thread; other threads call :meth:`call` to reach them."""

    def __init__(self, portal: DevPortal, client_ns: str, bind_ip: str, resource: Resource,
                 sink_address: tuple[str, int], *, seed: int = 7) -> None:
        self.portal = portal
        self.client_ns = client_ns
        self.bind_ip = bind_ip
        self.resource = resource
        self.sink_address = sink_address
        self.rng = random.Random(seed)
        self.sims: list[Sim] = []
        self._by_ref: dict[str, Sim] = {}
        self._by_id: dict[str, Sim] = {}
        self._sel = selectors.DefaultSelector()
        self._heap: list[tuple[float, int]] = []
        self._cursor = len(portal.events)
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-simclients", daemon=True)
        self._gateway = None
        self.on_ready: Callable[[Sim], None] | None = None
        self.errors = 0
        self.stuck_deadlines = 0  # handle_timeout left the deadline in the past

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sim in self.sims:
            sim.sock.close()
        self._sel.close()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the client thread (between two iterations)."""
        with self._lock:
            self._calls.append(fn)

    def add_client(self) -> Sim:
        """Create a client and request the resource; call on the client thread."""
        index = len(self.sims)
        now, wall = time.monotonic(), time.time()
        core = ClientCore(rng=self.rng, now=now, unix_now=wall)
        sock = in_netns(self.client_ns, self._socket)
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
        core.request(str(self.resource.id), now)
        self._flush(sim, now)
        return sim

    def send_data(self, sim: Sim, payload: bytes) -> bool:
        """Send one UDP datagram from ``sim`` to the sink through the tunnel."""
        packet = build_udp(sim.ipv4, self.sink_address[0], 40000 + sim.index % 20000,
                           self.sink_address[1], payload)
        ok = sim.core.inject(str(self.resource.id), packet, time.monotonic(), time.time())
        if ok:
            sim.sent += 1
            self._flush(sim, time.monotonic())
        return ok

    # ------------------------------------------------------------------ internals

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((self.bind_ip, 0))
        return sock

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
            timeout = 0.005
            if self._heap:
                timeout = min(timeout, max(0.0, self._heap[0][0] - time.monotonic()))
            for key, _ in self._sel.select(timeout):
                self._read(key.data)
            self._portal_events()
            self._timers()

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
            deadline, index = heapq.heappop(self._heap)
            sim = self.sims[index]
            if deadline == sim.scheduled:  # else a stale entry
                sim.scheduled = float("inf")
                due.append(sim)
        for sim in due:  # one pass: a deadline that stays in the past must not spin here
            sim.core.handle_timeout(now, time.time())
            self._flush(sim, now, floor=now + 0.001)

    def _flush(self, sim: Sim, now: float, floor: float = 0.0) -> None:
        core = sim.core
        while (tx := core.poll_transmit()) is not None:
            try:
                sim.sock.sendto(tx.payload, tx.dst)
            except OSError:
                self.errors += 1
        while core.poll_tun() is not None:
            pass
        while (push := core.poll_portal()) is not None:
            self._client_push(sim, *push)
        while (event := core.poll_event()) is not None:
            if isinstance(event, Ready) and sim.ready_at is None:
                sim.ready_at = time.monotonic()
                if self.on_ready is not None:
                    self.on_ready(sim)
            elif type(event).__name__ == "Failed":
                sim.failed = event.line()
        while (tx := core.poll_transmit()) is not None:  # on_ready may have sent data
            try:
                sim.sock.sendto(tx.payload, tx.dst)
            except OSError:
                self.errors += 1
        deadline = core.poll_timeout()
        if deadline is not None and deadline < floor:
            self.stuck_deadlines += 1
            deadline = floor
        if deadline is not None and deadline < sim.scheduled:
            sim.scheduled = deadline
            heapq.heappush(self._heap, (deadline, sim.index))

    def _gateway_info(self) -> Any:
        if self._gateway is None:
            self._gateway = self.portal.gateways()[-1]
        return self._gateway

    def _client_push(self, sim: Sim, event: str, payload: dict[str, Any]) -> None:
        if event == "create_flow":
            gw = self._gateway_info()
            creds = derive_ice_credentials(sim.client_id, sim.core.public_key, gw.id,
                                           gw.public_key)
            psk = generate_preshared_key(self.rng)
            sim.flow_ref = f"bench.{sim.index}.{self.rng.getrandbits(64):016x}"
            self._by_ref[sim.flow_ref] = sim
            sim.pending = {
                "resource_id": str(self.resource.id), "gateway_id": str(gw.id),
                "gateway_public_key": gw.public_key, "gateway_ipv4": None,
                "gateway_ipv6": None, "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(), "preshared_key": psk,
            }
            sim.authorized_at = time.monotonic()
            self.portal.push_to_gateway("authorize_flow", {
                "ref": sim.flow_ref,
                "flow_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                "actor": {"id": str(sim.client_id)},
                "resource": resource_to_json(self.resource),
                "expires_at": None,
                "client": {"id": str(sim.client_id), "public_key": sim.core.public_key,
                           "preshared_key": psk, "ipv4": sim.ipv4, "ipv6": sim.ipv6},
                "client_ice_credentials": creds.client.to_json(),
                "gateway_ice_credentials": creds.gateway.to_json(),
            }, gw.id)
        elif event == "broadcast_ice_candidates":
            self.portal.push_to_gateway("ice_candidates", {
                "client_id": str(sim.client_id), "candidates": payload["candidates"],
            }, self._gateway_info().id)

    def _portal_events(self) -> None:
        events = self.portal.events
        end = len(events)
        for record in events[self._cursor:end]:
            if record.direction != "in" or record.kind != "gateway":
                continue
            payload = record.payload if isinstance(record.payload, dict) else {}
            if record.event == "flow_authorized":
                sim = self._by_ref.get(str(payload.get("ref")))
                if sim is not None:
                    now = time.monotonic()
                    sim.core.handle_portal_message("flow_created", sim.pending,
                                                   now, time.time())
                    self._flush(sim, now)
            elif record.event == "broadcast_ice_candidates":
                gw = self._gateway_info()
                for cid in payload.get("client_ids", []):
                    sim = self._by_id.get(str(cid))
                    if sim is not None:
                        now = time.monotonic()
                        sim.core.handle_portal_message("ice_candidates", {
                            "gateway_id": str(gw.id), "candidates": payload.get("candidates", []),
                        }, now, time.time())
                        self._flush(sim, now)
        self._cursor = end
