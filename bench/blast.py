"""The gateway alone: UDP forwarding rate and gateway CPU per packet, with a fast sender.

The ``udp`` figures go through the dev client, a Python process that caps them at about
16-20k packets/s. Here one simulated client (:mod:`bench.simclient`, direct path) connects
for real (ICE + WireGuard), and then a separate load generator (:mod:`bench.blast_sender`,
encryption in a reused buffer, UDP GSO) sends at a fixed offered rate:

* **up**: WireGuard transport messages from the client's own socket (the fd is passed to
  the sender, so the gateway sees the nominated address), each carrying a 1280-byte
  IPv4/UDP packet (the tunnel MTU) for the resource. Delivered = datagrams that reached
  a UDP socket on the resource: ``InDatagrams + InErrors`` from ``/proc/net/snmp`` of its
  namespace. The sink's socket filter (classic BPF) drops every datagram in the kernel,
  which counts it in ``InErrors``: counting costs no Python CPU per packet and no buffer
  fills. The interface's rx_packets is logged as a cross-check; it counts a GSO
  super-packet once, which is why it is not the figure.
* **down**: the client sends one packet to a sender on the resource (this creates the
  gateway's masquerade entry); that sender then floods 1280-byte IP packets back to the
  masqueraded address. Delivered = UDP datagrams arriving in the client namespace, counted
  the same way: a filter on the client's socket drops transport messages for the bench's
  session in the kernel, so the simulated client still reads its ICE consent traffic
  (unanswered consent would make the gateway drop the client within ~11 s).

The sender uses UDP GSO, so the gateway's GRO socket receives trains of up to 49
datagrams per ``recvmsg`` (veth passes GSO packets whole), as from one fast sender behind
a GRO-capable NIC; ``gso=False`` sends one datagram per ``sendto`` instead.

Keys: the client's session keys are not reachable (the tunnel keeps only the bound AEAD
methods of ``cryptography``'s key objects). So before every step the bench makes a *new*
WireGuard session with the client's own identity (static key, gateway key, PSK from
:meth:`ClientCore.connection`) from the client's socket, as a client rekey would, and
confirms it with a keepalive. The gateway then has a fresh session (counter 0, 180 s of
life) that the simulated client's core does not know. The core's own session drops out of
the gateway after two such steps; the core sends only keepalives on it (which the gateway
then ignores) and rekeys on its own schedule. ICE consent, which keeps the gateway's
connection alive, stays with the core throughout.

Gateway CPU per delivered packet = delta of utime and stime of the gateway process (and
any children) over the step, divided by the packets delivered.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import select
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bench.blast_sender import transport_message, udp_packet
from bench.net import BenchNet, proc_cpu_split
from bench.report import Results
from bench.setup_latency import cidr_resource
from bench.simclient import Sim, SimClients
from devclient.core import DirectPath
from devstack.netns import in_netns
from devstack.topology import ADDRESSES, RESOURCE, python
from gateway.wg.constants import COOKIE_REPLY_LEN, MSG_COOKIE_REPLY, MSG_RESPONSE, RESPONSE_LEN
from gateway.wg.cookie import CookieJar
from gateway.wg.keys import StaticKeyPair
from gateway.wg.noise import (
    HandshakeContext,
    InitiatorState,
    consume_response,
    create_initiation,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
UP_PORT = 7010  # the resource's counting sink
DOWN_PORT = 7011  # the resource-side sender
UP_SPORT = 41000
DOWN_SPORT = 41001
IP_LEN = 1280  # the tunnel MTU: the largest packet a client sends
RATES = (10_000, 20_000, 40_000, 80_000, 120_000, 160_000)
QUICK_RATES = (20_000, 80_000, 160_000)
SETTLE_S = 0.3  # after the sender stops: the gateway drains its socket buffer
SO_ATTACH_FILTER = 26
_BPF = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k
_BPF_LD_B_ABS, _BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x30, 0x20, 0x15, 0x06
HANDSHAKE_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- session


@dataclass
class Session:
    """A transport session the bench made with the simulated client's identity."""

    receiver: int  # the gateway's index for this session (goes into every message)
    local_index: int
    send_key: bytes = field(repr=False)
    counter: int = 0

    def __post_init__(self) -> None:
        self._aead = ChaCha20Poly1305(self.send_key)

    def seal(self, packet: bytes) -> bytes:
        """One transport message with the next counter (keepalive: ``b""``)."""
        message = transport_message(self._aead, self.receiver, self.counter, packet)
        self.counter += 1
        return message


class Initiator:
    """Our side of one Noise_IKpsk2 handshake, built from the client's identity."""

    def __init__(self, static: StaticKeyPair, gateway_public: bytes, psk: bytes,
                 index: int) -> None:
        self.ctx = HandshakeContext(static, gateway_public, psk)
        self.jar = CookieJar(gateway_public)
        self.index = index
        self._state: InitiatorState | None = None

    def initiation(self, unix_now: float) -> bytes:
        """Message 1 with its macs (a fresh ephemeral key each time)."""
        body, self._state = create_initiation(self.ctx, self.index, os.urandom(32), unix_now)
        return self.jar.seal(body, time.monotonic())

    def is_reply(self, datagram: bytes) -> bool:
        """A response or cookie reply addressed to this handshake."""
        if len(datagram) == RESPONSE_LEN and datagram[0] == MSG_RESPONSE:
            return int.from_bytes(datagram[8:12], "little") == self.index
        if len(datagram) == COOKIE_REPLY_LEN and datagram[0] == MSG_COOKIE_REPLY:
            return int.from_bytes(datagram[4:8], "little") == self.index
        return False

    def complete(self, datagram: bytes) -> Session | None:
        """The session from a response; None after a cookie reply (then initiate again)."""
        if datagram[0] == MSG_COOKIE_REPLY:
            self.jar.consume_reply(datagram, time.monotonic())
            return None
        assert self._state is not None, "complete() before initiation()"
        peer_index, keys = consume_response(self.ctx, self._state, datagram)
        return Session(peer_index, self.index, keys.send)


class BlastClients(SimClients):
    """SimClients whose socket the bench can borrow: while paused, the loop does not read it.

    The handshake response must reach the bench, not the core (which would drop it)."""

    def on_loop(self, fn: Callable[[], object], timeout: float = 5.0) -> None:
        """Run ``fn`` on the client thread and wait until it ran."""
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        self.call(wrapped)
        if not done.wait(timeout):
            raise RuntimeError("the simulated-client loop did not answer")

    def pause(self, sim: Sim) -> None:
        self.on_loop(lambda: self._sel.unregister(sim.sock))

    def resume(self, sim: Sim) -> None:
        self.on_loop(lambda: self._sel.register(sim.sock, selectors.EVENT_READ, sim))

    def deliver(self, sim: Sim, data: bytes, src: tuple[str, int]) -> None:
        """A datagram the bench read while paused (ICE consent, say): on to the core."""

        def run() -> None:
            now = time.monotonic()
            sim.core.handle_datagram(sim.local, src, data, now, time.time())
            self._flush(sim, now)

        self.call(run)

    def handshake(self, sim: Sim, rng: random.Random) -> tuple[Session, tuple[str, int]]:
        """A new confirmed session with the gateway from ``sim``'s socket, and the path."""
        gateway = self.portal.gateways()[-1]
        conn = sim.core.connection(str(gateway.id))
        if conn is None or not isinstance(conn.path, DirectPath):
            raise RuntimeError(f"client {sim.index} has no direct path ({sim.failed})")
        remote = (str(conn.path.remote[0]), int(conn.path.remote[1]))
        index = rng.getrandbits(32)
        while conn.tunnel.owns_index(index):  # keep the core out of our session's traffic
            index = rng.getrandbits(32)
        initiator = Initiator(sim.core.static, conn.public_key, conn.psk, index)
        self.pause(sim)
        try:
            for _ in range(3):
                sim.sock.sendto(initiator.initiation(time.time()), remote)
                reply = self._await_reply(sim, initiator)
                if reply is None:
                    continue
                session = initiator.complete(reply)
                if session is not None:
                    sim.sock.sendto(session.seal(b""), remote)  # makes it the current one
                    return session, remote
        finally:
            self.resume(sim)
        raise RuntimeError("the gateway did not answer the bench's handshake")

    def _await_reply(self, sim: Sim, initiator: Initiator) -> bytes | None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sim.sock], [], [], left)[0]:
                continue
            try:
                data, src = sim.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                continue
            if initiator.is_reply(data):
                return data
            self.deliver(sim, data, (src[0], src[1]))
        return None


# --------------------------------------------------------------------------- measuring


def _udp_counters(text: str) -> dict[str, int]:
    rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}


@dataclass
class Counts:
    """Kernel counters of one namespace at one moment."""

    udp: dict[str, int]
    drops: dict[str, tuple[int, int]]  # interface -> (rx_dropped, tx_dropped)
    rx_packets: int  # of eth0

    @property
    def datagrams(self) -> int:
        """UDP datagrams that reached a socket: read, or dropped there (filter, full buffer)."""
        return self.udp.get("InDatagrams", 0) + self.udp.get("InErrors", 0)

    def drops_since(self, before: Counts) -> str:
        parts = []
        rcvbuf = self.udp.get("RcvbufErrors", 0) - before.udp.get("RcvbufErrors", 0)
        if rcvbuf:
            parts.append(f"udp rcvbuf {rcvbuf} (skbs: a GRO train counts once)")
        for name, (rx, tx) in sorted(self.drops.items()):
            rx0, tx0 = before.drops.get(name, (0, 0))
            if rx - rx0 or tx - tx0:
                parts.append(f"{name} rx {rx - rx0} tx {tx - tx0}")
        return ", ".join(parts) or "none"


def counts(net: BenchNet, role: str) -> Counts:
    out = net.run(role, "sh", "-c", "cat /proc/net/snmp; echo ==; cat /proc/net/dev; echo ==; "
                  "cat /sys/class/net/eth0/statistics/rx_packets").stdout
    snmp, dev, rx = out.split("==\n")
    drops: dict[str, tuple[int, int]] = {}
    for line in dev.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        drops[name.strip()] = (int(values[3]), int(values[11]))
    return Counts(_udp_counters(snmp), drops, int(rx))


def attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """A classic BPF socket filter; what it drops the kernel counts in Udp ``InErrors``."""
    code = b"".join(_BPF.pack(*insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))  # the kernel copies it
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def drop_all(sock: socket.socket) -> None:
    attach_filter(sock, [(_BPF_RET_K, 0, 0, 0)])


def drop_transport(sock: socket.socket, index: int) -> None:
    """Drop type-4 messages to ``index``; pass everything else (ICE, other sessions).

    A UDP socket's filter sees the packet from the UDP header: the payload is at 8."""
    swapped = int.from_bytes(index.to_bytes(4, "little"), "big")  # BPF loads big-endian
    attach_filter(sock, [
        (_BPF_LD_B_ABS, 0, 0, 8),  # message type
        (_BPF_JEQ_K, 0, 3, 4),
        (_BPF_LD_W_ABS, 0, 0, 12),  # receiver index
        (_BPF_JEQ_K, 0, 1, swapped),
        (_BPF_RET_K, 0, 0, 0),
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),
    ])


def tree_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of ``pid`` and its descendants (should workers appear)."""
    user = system = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            u, s = proc_cpu_split(current)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        user += u
        system += s
    return user, system


@dataclass
class Step:
    """One measurement at one offered rate."""

    direction: str
    rate: int
    sent: int
    seconds: float
    delivered: int
    user_s: float
    sys_s: float
    sender_cpu_s: float
    gso: bool
    rx_packets: int
    #: The sender's send calls: sent / sends is the load's datagrams per send (its GSO runs).
    sends: int = 0
    note: str = ""

    @property
    def offered_pps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def delivered_pps(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def loss_percent(self) -> float:
        return max(0.0, 100.0 * (self.sent - self.delivered) / self.sent) if self.sent else 0.0

    @property
    def datagrams_per_send(self) -> float:
        return self.sent / self.sends if self.sends else 0.0

    def per_packet_us(self, seconds: float) -> float | None:
        return seconds / self.delivered * 1e6 if self.delivered else None


class SenderProc:
    """``python -m bench.blast_sender`` in a namespace; stdin/stdout line protocol."""

    def __init__(self, net: BenchNet, role: str, config: dict[str, Any],
                 pass_fds: Sequence[int] = ()) -> None:
        self._stderr = open(net.tmp / f"blast-sender-{role}.log", "ab")  # noqa: SIM115
        self.proc = net.stack.topo.popen(
            role, [python(), "-m", "bench.blast_sender"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, pass_fds=tuple(pass_fds),
            cwd=str(REPO), bufsize=0)
        self._write(json.dumps(config))  # holds the key: never logged

    def _write(self, line: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")

    def read_line(self, timeout: float) -> str:
        """The next stdout line; raises when the sender exits or stays silent."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise RuntimeError(f"blast sender silent for {timeout} s")
            chunk = os.read(stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"blast sender exited ({self.proc.wait(5)}); see "
                                   f"{self._stderr.name}")
            data += chunk
        return data.decode().strip()

    def expect(self, prefix: str, timeout: float) -> str:
        line = self.read_line(timeout)
        if not line.startswith(prefix):
            raise RuntimeError(f"blast sender said {line!r}, expected {prefix}")
        return line

    def go(self, seconds: float) -> dict[str, Any]:
        self._write("GO")
        result: dict[str, Any] = json.loads(self.read_line(seconds + 30))
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


@contextmanager
def sender(net: BenchNet, role: str, config: dict[str, Any],
           pass_fds: Sequence[int] = ()) -> Iterator[SenderProc]:
    proc = SenderProc(net, role, config, pass_fds)
    try:
        yield proc
    finally:
        proc.close()


class Blast:
    """One simulated client, the resource's sink, and the steps run against them."""

    def __init__(self, net: BenchNet, *, gso: bool = True) -> None:
        self.net = net
        self.gso = gso
        self.rng = random.Random(1)
        self.reconnects = 0  # a new seed each time: a new key and client id
        self.clients, self.sim = connect_one(net)

    def reconnect(self) -> None:
        """A fresh simulated client (after the gateway dropped the old one, say)."""
        self.clients.stop()
        self.reconnects += 1
        self.clients, self.sim = connect_one(self.net, seed=7 + self.reconnects)

    def close(self) -> None:
        self.clients.stop()

    def _measure(self, direction: str, rate: int, count_role: str, proc: SenderProc,
                 seconds: float) -> Step:
        pid = self.net.gateway_pid
        before, cpu0 = counts(self.net, count_role), tree_cpu(pid)
        gw0 = counts(self.net, "gateway")
        result = proc.go(seconds)
        time.sleep(SETTLE_S)
        cpu1 = tree_cpu(pid)
        after, gw1 = counts(self.net, count_role), counts(self.net, "gateway")
        return Step(direction, rate, int(result["sent"]), float(result["seconds"]),
                    after.datagrams - before.datagrams, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1],
                    float(result["cpu_s"]), bool(result["gso"]),
                    after.rx_packets - before.rx_packets, int(result.get("sends", 0)),
                    f"drops in the gateway namespace: {gw1.drops_since(gw0)}")

    def up(self, rate: int, seconds: float) -> Step:
        session, remote = self.clients.handshake(self.sim, self.rng)
        config = {"mode": "up", "fd": self.sim.sock.fileno(), "dst": list(remote),
                  "receiver": session.receiver, "key": session.send_key.hex(),
                  "counter": session.counter, "src": self.sim.ipv4, "dst_ip": RESOURCE,
                  "sport": UP_SPORT, "dport": UP_PORT, "ip_len": IP_LEN, "rate": rate,
                  "seconds": seconds, "gso": self.gso}
        with sender(self.net, "client", config, pass_fds=[self.sim.sock.fileno()]) as proc:
            proc.expect("READY", 15)
            return self._measure("up", rate, "resource", proc, seconds)

    def down(self, rate: int, seconds: float) -> Step:
        session, remote = self.clients.handshake(self.sim, self.rng)
        drop_transport(self.sim.sock, session.local_index)
        config = {"mode": "down", "bind": [RESOURCE, DOWN_PORT], "payload_len": IP_LEN - 28,
                  "rate": rate, "seconds": seconds, "wait": 5.0, "gso": self.gso}
        trigger = udp_packet(self.sim.ipv4, RESOURCE, DOWN_SPORT, DOWN_PORT, 64)
        with sender(self.net, "resource", config) as proc:
            proc.expect("BOUND", 15)
            for _ in range(20):  # until the trigger got through
                self.sim.sock.sendto(session.seal(trigger), remote)
                try:
                    proc.expect("READY", 0.25)
                    break
                except RuntimeError as exc:
                    if "silent" not in str(exc):
                        raise
            else:
                raise RuntimeError("the trigger never reached the resource")
            return self._measure("down", rate, "client", proc, seconds)

    def sender_max(self, seconds: float) -> Step:
        """The sender alone, unlimited, to a dropping socket on the client's loopback."""
        sink = in_netns(self.net.stack.topo.ns("client"), lambda: _bound(("127.0.0.1", 0)))
        drop_all(sink)
        out = in_netns(self.net.stack.topo.ns("client"), lambda: _bound(("127.0.0.1", 0)))
        try:
            config = {"mode": "up", "fd": out.fileno(), "dst": list(sink.getsockname()),
                      "receiver": 1, "key": os.urandom(32).hex(), "counter": 0,
                      "src": self.sim.ipv4, "dst_ip": RESOURCE, "sport": UP_SPORT,
                      "dport": UP_PORT, "ip_len": IP_LEN, "rate": 0, "seconds": seconds,
                      "gso": self.gso}
            with sender(self.net, "client", config, pass_fds=[out.fileno()]) as proc:
                proc.expect("READY", 15)
                result = proc.go(seconds)
            return Step("self", 0, int(result["sent"]), float(result["seconds"]),
                        int(result["sent"]), 0.0, 0.0, float(result["cpu_s"]),
                        bool(result["gso"]), 0)
        finally:
            sink.close()
            out.close()


def _bound(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(address)
    return sock


def connect_one(net: BenchNet, seed: int = 7) -> tuple[BlastClients, Sim]:
    """One simulated client over the direct path, WireGuard handshake done."""
    portal = net.stack.portal
    assert portal is not None
    clients = BlastClients(portal, net.stack.topo.ns("client"), ADDRESSES["client"],
                           cidr_resource(net), (RESOURCE, UP_PORT), seed=seed)
    clients.start()
    try:
        clients.on_loop(clients.add_client)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not (clients.sims and clients.sims[0].ready_at is not None):
            if time.monotonic() > deadline:
                failed = clients.sims[0].failed if clients.sims else "not created"
                raise RuntimeError(f"the simulated client did not connect ({failed})")
            time.sleep(0.01)
        return clients, clients.sims[0]
    except BaseException:
        clients.stop()
        raise


# --------------------------------------------------------------------------- the bench


def _record(results: Results, step: Step, log_fn: Callable[[str], None]) -> None:
    base = f"gateway_only.udp_{step.direction}_{step.rate // 1000}k"
    path = ("client socket -> gateway -> resource" if step.direction == "up"
            else "resource -> gateway -> client socket")
    note = (f"{IP_LEN}-byte IP packets, {path}, bench.blast_sender with "
            f"{'UDP GSO' if step.gso else 'one sendto per datagram'}, target "
            f"{step.rate} packets/s")
    user = step.per_packet_us(step.user_s)
    system = step.per_packet_us(step.sys_s)
    total = step.per_packet_us(step.user_s + step.sys_s)
    results.add(f"{base}.offered_pps", step.offered_pps, "packets/s", note)
    results.add(f"{base}.delivered_pps", step.delivered_pps, "packets/s",
                "UDP datagrams reaching a socket in the receiving namespace (/proc/net/snmp "
                "InDatagrams + InErrors) / send time")
    results.add(f"{base}.loss_percent", step.loss_percent, "%")
    results.add(f"{base}.datagrams_per_send", step.datagrams_per_send, "datagrams",
                "the load's shape: datagrams per sendmsg of the sender (its GSO runs), "
                "which the gateway's GRO socket receives as trains")
    results.add(f"{base}.gateway_cpu_us_per_packet", total, "us",
                "gateway utime+stime over the step / delivered")
    results.add(f"{base}.gateway_user_us_per_packet", user, "us")
    results.add(f"{base}.gateway_sys_us_per_packet", system, "us")
    cores = (step.user_s + step.sys_s) / (step.seconds + SETTLE_S)
    results.add(f"{base}.gateway_cores", cores, "cores",
                "gateway CPU seconds / (send time + settle)")
    us = "-" if total is None else f"{total:.1f} ({user:.1f} user + {system:.1f} sys)"
    log_fn(f"  {step.direction:>4} {step.rate // 1000:>3}k: offered {step.offered_pps:>8,.0f}/s "
           f"delivered {step.delivered_pps:>8,.0f}/s loss {step.loss_percent:5.1f} % "
           f"gateway {us} us/pkt, {cores:.2f} cores; "
           f"sender {step.sender_cpu_s / max(step.sent, 1) * 1e6:.1f} us/pkt, "
           f"{step.datagrams_per_send:.1f} per send; "
           f"rx_packets {step.rx_packets}, {step.note}")


def run_blast(net: BenchNet, results: Results, *, rates: Sequence[int], seconds: float,
              repeat: int, down: bool = True, gso: bool = True,
              log: Callable[[str], None] = print) -> None:
    """Rate sweeps up (and down), ``repeat`` times; see the module docstring."""
    sink = in_netns(net.stack.topo.ns("resource"), lambda: _bound((RESOURCE, UP_PORT)))
    drop_all(sink)  # a bound socket, so the resource answers with no ICMP
    blast = Blast(net, gso=gso)
    try:
        for rep in range(repeat):
            mine = blast.sender_max(min(seconds, 2.0))
            per_packet = mine.sender_cpu_s / max(mine.sent, 1) * 1e6
            results.add("gateway_only.sender_max_pps", mine.offered_pps, "packets/s",
                        "bench.blast_sender alone, unlimited, to a dropping loopback socket")
            results.add("gateway_only.sender_cpu_us_per_packet", per_packet, "us")
            log(f"  [{rep + 1}/{repeat}] sender alone: {mine.offered_pps:,.0f} packets/s "
                f"({'GSO' if mine.gso else 'no GSO'}, {per_packet:.2f} us/pkt)")
            for direction in ("up", "down") if down else ("up",):
                best = 0.0
                for rate in rates:
                    try:
                        step = blast.up(rate, seconds) if direction == "up" else blast.down(
                            rate, seconds)
                    except RuntimeError as exc:  # one bad step must not lose the others
                        log(f"  {direction:>4} {rate // 1000:>3}k: failed ({exc}); "
                            "reconnecting the simulated client")
                        blast.reconnect()
                        continue
                    _record(results, step, log)
                    best = max(best, step.delivered_pps)
                results.add(f"gateway_only.udp_{direction}_max_delivered_pps", best,
                            "packets/s", "best delivered rate of the sweep")
    finally:
        blast.close()
        sink.close()
