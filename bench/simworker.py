"""Simulated clients spread over worker processes, so the bench is not the scale bottleneck.

One Python thread cannot run 5 000 client cores next to the dev portal; the machine has two
cores, shared with the gateway under test. Each worker is a process started with ``ip netns
exec <client ns> python -m bench.simworker <fd>``, so it and its sockets live in the client
namespace, running a :class:`bench.simclient.SimEngine` over its own share of the clients.
The dev portal stays in the bench process, because the gateway's websocket ends there. One
socket pair per worker (a ``multiprocessing`` :class:`Connection`: pickled messages) carries:

* worker -> bench: :class:`Push` (``authorize_flow``, ``ice_candidates`` for the portal to
  push to the gateway), :class:`ClientReady` / :class:`ClientFailed` (per-client timing on
  the shared ``CLOCK_MONOTONIC``), :class:`Stats` (the answer to a :class:`StatsRequest`);
* bench -> worker: :class:`Connect`, :class:`GatewayAnswer` (the gateway's
  ``flow_authorized`` and ``broadcast_ice_candidates`` as the portal recorded them),
  :class:`StartTrickle`, :class:`StatsRequest`, :class:`Stop`.

:class:`Router` learns from the pushes which worker owns which flow ref and client id, so
every answer goes only to the worker that needs it. Workers add their clients themselves,
each keeping its share of the outstanding-flow window, so connecting needs no round trip
per client through the bench process.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.net import proc_cpu_seconds
from bench.simclient import Sim, SimEngine, gateway_answers, raise_fd_limit, udp_socket
from devportal.server import DevPortal
from gateway.resources import Resource

REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1

# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker needs to start (its first message)."""

    worker: int
    bind_ip: str
    resource: Resource
    sink_address: tuple[str, int]
    gateway_id: uuid.UUID
    gateway_public_key: str
    first_index: int
    seed: int
    fd_limit: int


@dataclass(frozen=True, slots=True)
class Push:
    """Worker -> bench: have the portal push ``event`` to the gateway."""

    event: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClientReady:
    """Worker -> bench: client ``index``'s handshake completed."""

    index: int
    authorized_at: float | None
    ready_at: float


@dataclass(frozen=True, slots=True)
class ClientFailed:
    """Worker -> bench: client ``index`` reported a failure (before or after being ready)."""

    index: int
    authorized_at: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Bench -> worker: add ``count`` clients, at most ``window`` of them still connecting
    and at most ``rate`` new ones per second (0: no limit)."""

    count: int
    window: int
    rate: float = 0.0


@dataclass(frozen=True, slots=True)
class GatewayAnswer:
    """Bench -> worker: an answer of the gateway, as recorded by the portal."""

    event: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StartTrickle:
    """Bench -> worker: ``percent`` % of the ready clients send a datagram every ``period``;
    ``percent`` 0 stops the trickle."""

    percent: int
    period: float


@dataclass(frozen=True, slots=True)
class StatsRequest:
    seq: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Worker -> bench: cumulative counters at ``at``, except ``max_lag_s`` (since the
    previous request)."""

    seq: int
    worker: int
    at: float
    clients: int
    ready: int
    failed: int
    idle: int
    trickling: int
    trickle_due: int
    trickle_sent: int
    trickle_unsent: int
    trickle_late: int
    trickle_missed: int
    max_lag_s: float
    late_timers: int
    stuck_deadlines: int
    errors: int


@dataclass(frozen=True, slots=True)
class Stop:
    pass


ToWorker = Connect | GatewayAnswer | StartTrickle | StatsRequest | Stop
FromWorker = Push | ClientReady | ClientFailed | Stats


class Router:
    """Which worker owns which flow ref and client id, learnt from the workers' pushes."""

    def __init__(self) -> None:
        self._refs: dict[str, int] = {}
        self._clients: dict[str, int] = {}

    def note_push(self, worker: int, push: Push) -> None:
        payload = push.payload
        if push.event == "authorize_flow":
            self._refs[str(payload["ref"])] = worker
            self._clients[str(payload["client"]["id"])] = worker
        elif push.event == "ice_candidates":
            self._clients[str(payload["client_id"])] = worker

    def route(self, event: str, payload: dict[str, Any]) -> list[int]:
        """The workers that must see this answer of the gateway (none if nobody owns it)."""
        if event == "flow_authorized":
            worker = self._refs.get(str(payload.get("ref")))
            return [] if worker is None else [worker]
        if event == "broadcast_ice_candidates":
            owners = {self._clients.get(str(cid)) for cid in payload.get("client_ids", [])}
            return sorted(w for w in owners if w is not None)
        return []


# --------------------------------------------------------------------------- worker side


class _WorkerEngine(SimEngine):
    """The engine in a worker: pushes go up the pipe, commands come down it."""

    def __init__(self, config: WorkerConfig,
                 conn: multiprocessing.connection.Connection) -> None:
        # The process runs inside the client namespace (ip netns exec), so are its sockets.
        super().__init__(config.resource, config.sink_address,
                         partial(udp_socket, config.bind_ip), seed=config.seed,
                         first_index=config.first_index)
        self.config = config
        self._conn = conn
        self._to_add = 0
        self._window = 0
        self._rate = 0.0
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self.running = True
        self.on_ready = self._report_ready
        self.on_failed = self._report_failed
        self.register(conn, self._commands)

    def run(self) -> None:
        while self.running:
            self._top_up()
            self.run_once(1.0 if not (self._to_add and self._rate) else 1.0 / self._rate)

    def _top_up(self) -> None:
        outstanding = len(self.sims) - self.ready_count - self.failed_count
        room = min(self._window - outstanding, self._to_add)
        if self._rate:
            now = time.monotonic()
            burst = max(1.0, self._rate / 10)  # at most 100 ms worth at once
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self._rate)
            self._tokens_at = now
            room = min(room, int(self._tokens))
            self._tokens -= max(room, 0)
        for _ in range(room):
            self.add_client()
            self._to_add -= 1

    def _gateway_identity(self) -> tuple[uuid.UUID, str]:
        return self.config.gateway_id, self.config.gateway_public_key

    def _push(self, event: str, payload: dict[str, Any]) -> None:
        self._conn.send(Push(event, payload))

    def _report_ready(self, sim: Sim) -> None:
        assert sim.ready_at is not None
        self._conn.send(ClientReady(sim.index, sim.authorized_at, sim.ready_at))

    def _report_failed(self, sim: Sim) -> None:
        self._conn.send(ClientFailed(sim.index, sim.authorized_at, sim.failed or "?"))

    def _commands(self) -> None:
        try:
            while self.running and self._conn.poll():
                self._command(self._conn.recv())
        except (EOFError, OSError):  # the bench is gone
            self.running = False

    def _command(self, msg: ToWorker) -> None:
        if isinstance(msg, GatewayAnswer):
            self.handle_gateway_answer(msg.event, msg.payload)
        elif isinstance(msg, Connect):
            self._to_add += msg.count
            self._window = msg.window
            self._rate = msg.rate
            self._tokens, self._tokens_at = 0.0, time.monotonic()
        elif isinstance(msg, StartTrickle):
            if msg.percent > 0:
                self.start_trickle(msg.percent, msg.period)
            else:
                self.stop_trickle()
        elif isinstance(msg, StatsRequest):
            self._conn.send(self._stats(msg.seq))
        elif isinstance(msg, Stop):
            self.running = False

    def _stats(self, seq: int) -> Stats:
        now = time.monotonic()
        trickle = self.trickle
        return Stats(seq=seq, worker=self.config.worker, at=now, clients=len(self.sims),
                     ready=self.ready_count, failed=self.failed_count,
                     idle=self.idle_clients(), trickling=trickle.size(),
                     trickle_due=trickle.due(now), trickle_sent=self.trickle_sent,
                     trickle_unsent=self.trickle_unsent, trickle_late=trickle.late,
                     trickle_missed=trickle.missed, max_lag_s=self.take_max_lag(),
                     late_timers=self.late_timers, stuck_deadlines=self.stuck_deadlines,
                     errors=self.errors)


def _die_with_parent() -> None:
    """SIGKILL this worker when the bench process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_main(fd: int) -> None:
    """A worker process: the first message on the socket ``fd`` is its :class:`WorkerConfig`."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us, Ctrl-C or not
    conn = multiprocessing.connection.Connection(fd)
    config = conn.recv()
    assert isinstance(config, WorkerConfig)
    logging.basicConfig(level=logging.WARNING, format=f"simworker {config.worker}: %(message)s")
    raise_fd_limit(config.fd_limit)
    engine = _WorkerEngine(config, conn)
    try:
        engine.run()
    finally:
        engine.close()
        conn.close()


# --------------------------------------------------------------------------- bench side


@dataclass
class ClientRecord:
    """What the bench knows about one simulated client (``time.monotonic``)."""

    index: int
    authorized_at: float | None = None
    ready_at: float | None = None
    failed: str | None = None


@dataclass
class _Worker:
    config: WorkerConfig
    process: subprocess.Popen[bytes]
    conn: multiprocessing.connection.Connection
    count: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True


class SimWorkers:
    """``clients`` simulated clients over ``workers`` processes, run from the bench.

    Workers are fresh interpreters, not ``multiprocessing`` children, so they import
    nothing of the bench's main module and need no ``setns`` per socket. A relay thread
    in this process moves pushes to the portal, the gateway's answers to the owning
    worker, and the workers' reports into :attr:`records`."""

    def __init__(self, portal: DevPortal, client_ns: str, bind_ip: str, resource: Resource,
                 sink_address: tuple[str, int], *, clients: int, workers: int,
                 seed: int = 7) -> None:
        self.portal = portal
        self.client_ns = client_ns
        self.records: dict[int, ClientRecord] = {}
        self.ready = 0
        self.failed = 0  # before they were ever ready
        self.dropped: Counter[str] = Counter()  # failure reasons of clients once ready
        self.router = Router()
        self._cursor = len(portal.events)
        self._stop = threading.Event()
        self._stopping = False
        self._cond = threading.Condition()
        self._stats: dict[int, Stats] = {}
        self._seq = 0
        gateway = portal.gateways()[-1]
        self._gateway_id = gateway.id
        workers = max(1, min(workers, clients))
        share = -(-clients // workers)
        self._configs = [
            WorkerConfig(k, bind_ip, resource, sink_address, gateway.id, gateway.public_key,
                         k * share, seed + k, share + 256)
            for k in range(workers)
        ]
        self._counts = [max(0, min(share, clients - c.first_index)) for c in self._configs]
        self._workers: list[_Worker] = []
        self._relay = threading.Thread(target=self._relay_loop, name="bench-simrelay",
                                       daemon=True)

    def start(self) -> None:
        """Start the workers; :meth:`stop` must follow, also when this raises."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for config, count in zip(self._configs, self._counts, strict=True):
            ours, theirs = socket.socketpair()
            with ours, theirs:
                process = subprocess.Popen(
                    ["ip", "netns", "exec", self.client_ns, sys.executable, "-m",
                     "bench.simworker", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), env=env, cwd=str(REPO))
                conn = multiprocessing.connection.Connection(ours.detach())
            worker = _Worker(config, process, conn, count)
            self._workers.append(worker)
            self._send(worker, config)
        self._relay.start()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def alive(self) -> int:
        """Workers still running (a dead one is logged by the relay)."""
        return sum(1 for w in self._workers if w.alive and w.process.poll() is None)

    def connect(self, window: int, rate: float = 0.0) -> None:
        """Every worker adds its share, with ``window`` flows outstanding and at most
        ``rate`` new flows per second in total (0: no limit)."""
        per = max(1, window // len(self._workers))
        for w in self._workers:
            self._send(w, Connect(w.count, per, rate / len(self._workers)))

    def trickle(self, percent: int, period: float) -> None:
        for w in self._workers:
            self._send(w, StartTrickle(percent, period))

    def stats(self, timeout: float = 10.0) -> list[Stats]:
        """Every live worker's counters now; a worker that does not answer in time (a
        stalled loop) is missing from the list."""
        with self._cond:
            self._seq += 1
            seq = self._seq
        for w in self._workers:
            self._send(w, StatsRequest(seq))
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(lambda: self._answered(seq),
                                max(0.0, deadline - time.monotonic()))
            return [s for s in self._stats.values() if s.seq == seq]

    def _answered(self, seq: int) -> bool:
        return all((s := self._stats.get(w.config.worker)) is not None and s.seq == seq
                   for w in self._workers if w.alive)

    def cpu_seconds(self) -> list[float]:
        """utime + stime of each worker so far."""
        out = []
        for pid in self.pids:
            try:
                out.append(proc_cpu_seconds(pid))
            except OSError:
                out.append(0.0)
        return out

    def stop(self) -> None:
        """Stop the workers (politely, then SIGTERM, then SIGKILL) and the relay."""
        self._stopping = True
        for w in self._workers:
            self._send(w, Stop())
        for w in self._workers:
            for step in (None, w.process.terminate, w.process.kill):
                if step is not None:
                    step()
                try:
                    w.process.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._stop.set()
        if self._relay.is_alive():
            self._relay.join(5)
        for w in self._workers:
            w.conn.close()

    # ------------------------------------------------------------------ relay

    def _send(self, w: _Worker, msg: ToWorker | WorkerConfig) -> None:
        if not w.alive:
            return
        try:
            with w.send_lock:
                w.conn.send(msg)
        except OSError as exc:
            log.error("simworker %d: cannot send (%s)", w.config.worker, exc)
            w.alive = False

    def _relay_loop(self) -> None:
        by_conn = {w.conn: w for w in self._workers}
        while not self._stop.is_set():
            live = [w.conn for w in self._workers if w.alive]
            for conn in multiprocessing.connection.wait(live, timeout=0.005):
                assert isinstance(conn, multiprocessing.connection.Connection)
                self._drain(by_conn[conn])
            answers, self._cursor = gateway_answers(self.portal, self._cursor)
            for event, payload in answers:
                for k in self.router.route(event, payload):
                    self._send(self._workers[k], GatewayAnswer(event, payload))

    def _drain(self, w: _Worker) -> None:
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            if not self._stopping:
                log.error("simworker %d exited (code %s)", w.config.worker,
                          w.process.poll())
            w.alive = False
        except Exception:  # a bench bug must not silently kill the relay
            log.exception("simworker %d: bad message", w.config.worker)

    def _handle(self, w: _Worker, msg: FromWorker) -> None:
        if isinstance(msg, Push):
            self.router.note_push(w.config.worker, msg)
            self.portal.push_to_gateway(msg.event, msg.payload, self._gateway_id)
        elif isinstance(msg, ClientReady):
            record = self.records.setdefault(msg.index, ClientRecord(msg.index))
            record.authorized_at, record.ready_at = msg.authorized_at, msg.ready_at
            self.ready += 1
        elif isinstance(msg, ClientFailed):
            record = self.records.setdefault(msg.index, ClientRecord(msg.index))
            record.authorized_at = msg.authorized_at
            if record.ready_at is not None:
                self.dropped[msg.reason] += 1
            elif record.failed is None:
                self.failed += 1
            record.failed = msg.reason
        elif isinstance(msg, Stats):
            with self._cond:
                self._stats[msg.worker] = msg
                self._cond.notify_all()


if __name__ == "__main__":
    # Run from the imported module, not from __main__: unpickled messages must be instances
    # of bench.simworker's classes.
    from bench.simworker import worker_main as _main

    _main(int(sys.argv[1]))
