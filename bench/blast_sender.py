"""Load generator for :mod:`bench.blast`: floods UDP at a fixed rate, with UDP GSO.

Run as ``python -m bench.blast_sender`` (in a namespace, by :mod:`bench.blast`). It reads
one JSON line of configuration from stdin, prepares, writes ``READY`` and waits for a
``GO`` line, then sends for ``seconds`` at ``rate`` datagrams per second and writes one
JSON line (``sent``, ``seconds``, ``gso``, ``segments_per_send``, ``cpu_s``). The
configuration carries a session key: it is never written anywhere.

Modes:

* ``up``: WireGuard type-4 transport messages on an inherited socket (``fd``, the
  simulated client's, so the gateway sees the nominated address) to ``dst``. Each message
  carries the same IPv4/UDP packet, encrypted with its own counter.
* ``down``: plain UDP from a socket bound to ``bind``. It first waits for one datagram
  (the client's packet through the gateway, which creates the masquerade entry) and
  then sends ``payload_len``-byte datagrams back to its source.

Python encrypts about one packet per 1.5-2 µs; the syscalls are few because one
``sendmsg`` with ``UDP_SEGMENT`` carries up to 64 datagrams (fewer when 64 KiB is the
limit). Without GSO it falls back to one ``sendto`` per datagram.
"""

from __future__ import annotations

import errno
import json
import logging
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gateway.packet.ip import build_udp

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
#: One GSO send is a single UDP datagram to the kernel, so all segments share 64 KiB.
MAX_GSO_BYTES = 65000
MAX_GSO_SEGMENTS = 64
MSG_TRANSPORT = 4
HEADER = struct.Struct("<IIQ")  # type (u32 LE: 4, reserved zero), receiver index, counter
NONCE = struct.Struct("<4xQ")
TAG_LEN = 16
#: Falling further behind than this (a stall) is skipped, not sent as one huge burst.
MAX_LAG_S = 0.004
TICK_S = 0.001
_GSO_ERRORS = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


def pad16(packet: bytes) -> bytes:
    """WireGuard pads the plaintext to a multiple of 16 bytes (the WireGuard paper, §5.4.6)."""
    return packet + bytes(-len(packet) & 15)


def udp_packet(src: str, dst: str, sport: int, dport: int, ip_len: int) -> bytes:
    """An IPv4/UDP packet of exactly ``ip_len`` bytes with correct checksums."""
    return build_udp(src, dst, sport, dport, bytes(ip_len - 28))


def transport_message(aead: ChaCha20Poly1305, receiver: int, counter: int,
                      packet: bytes) -> bytes:
    """One type-4 message; for the odd single packet (keepalive, trigger) and the tests."""
    return HEADER.pack(MSG_TRANSPORT, receiver, counter) + aead.encrypt(
        NONCE.pack(counter), pad16(packet), None)


class TransportBatch:
    """Encrypts one packet into consecutive transport messages in a reused buffer.

    The buffer is what one GSO ``sendmsg`` sends: equal-sized messages back to back,
    each sealed with its own counter (``encrypt_into`` writes in place, no copies).
    """

    def __init__(self, key: bytes, receiver: int, first_counter: int, packet: bytes,
                 capacity: int) -> None:
        self._plain = pad16(packet)
        self.size = HEADER.size + len(self._plain) + TAG_LEN
        self._buf = bytearray(self.size * capacity)
        self._view = memoryview(self._buf)
        self._seal_into = ChaCha20Poly1305(key).encrypt_into
        self.receiver = receiver
        self.counter = first_counter

    def fill(self, count: int) -> memoryview:
        """The next ``count`` messages; counters continue from the previous call."""
        buf, view, size, plain = self._buf, self._view, self.size, self._plain
        seal_into, pack_header, pack_nonce = self._seal_into, HEADER.pack_into, NONCE.pack
        receiver, first = self.receiver, self.counter
        offset = 0
        for counter in range(first, first + count):
            pack_header(buf, offset, MSG_TRANSPORT, receiver, counter)
            seal_into(pack_nonce(counter), plain, None, view[offset + 16:offset + size])
            offset += size
        self.counter += count
        return view[:offset]


class PlainBatch:
    """The same UDP payload repeated: the resource side needs no per-datagram work."""

    def __init__(self, payload_len: int, capacity: int) -> None:
        self.size = payload_len
        self._view = memoryview(bytes(payload_len * capacity))

    def fill(self, count: int) -> memoryview:
        return self._view[:count * self.size]


class Sender:
    """Sends ``fill(n)`` buffers at a rate; GSO when the kernel takes it."""

    def __init__(self, sock: socket.socket, dst: tuple[str, int],
                 fill: Callable[[int], memoryview], size: int, *, gso: bool = True) -> None:
        self.sock = sock
        self.dst = dst
        self.fill = fill
        self.size = size
        self.gso = gso
        self.per_send = self._per_send()
        #: sendmsg/sendto calls made: sent / sends is the load's datagrams per send.
        self.sends = 0
        self._cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]

    def _per_send(self) -> int:
        return max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // self.size)) if self.gso else 1

    def send(self, count: int) -> None:
        """Send ``count`` datagrams (at most ``per_send``)."""
        data = self.fill(count)
        if self.gso:
            try:
                self._retry(self.sock.sendmsg, [data], self._cmsg, 0, self.dst)
                self.sends += 1
                return
            except OSError as exc:
                if exc.errno not in _GSO_ERRORS:
                    raise
                log.warning("UDP GSO unavailable (%s): one sendto per datagram", exc)
                self.gso = False
                self.per_send = self._per_send()
        size = self.size
        for offset in range(0, len(data), size):
            self._retry(self.sock.sendto, data[offset:offset + size], self.dst)
            self.sends += 1

    def _retry(self, op: Callable[..., int], *args: Any) -> None:
        """The simulated client's socket is non-blocking (shared file status): wait for room."""
        while True:
            try:
                op(*args)
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.sock], [], 0.05)

    def run(self, rate: float, seconds: float, clock: Callable[[], float] = time.perf_counter,
            sleep: Callable[[float], None] = time.sleep) -> tuple[int, float]:
        """Send for ``seconds`` at ``rate`` per second (``rate <= 0``: as fast as possible).

        One burst per tick (``TICK_S``) brings the count up to the schedule, in sends of
        ``per_send``; then the sender sleeps until the next tick. A burst that overran its
        tick is followed at once by the next, which is then as large as the overrun. It
        never chases the schedule datagram by datagram: when one send costs more than the
        gap between two datagrams (a CPU-starved sender at ~120k/s on 2 cores), that
        would decay into sends of 1-4 datagrams, a different load from the one measured
        at every other rate. Returns (sent, elapsed).
        """
        sent = skipped = 0
        start = clock()
        end = start + seconds
        tick = start
        lag_cap = max(self.per_send, int(rate * MAX_LAG_S))
        send, per_send = self.send, self.per_send
        while True:
            now = clock()
            if now >= end:
                break
            if rate > 0:
                due = int((now - start) * rate) - sent - skipped
                if due > lag_cap:
                    skipped += due - lag_cap
                    due = lag_cap
            else:
                due = per_send
            while due > 0:
                n = min(due, self.per_send)
                send(n)
                sent += n
                due -= n
            if rate > 0:
                tick += TICK_S
                pause = tick - clock()
                if pause > 0:
                    sleep(pause)
                else:
                    tick = clock()  # behind: the next burst carries the overrun
        return sent, clock() - start


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def prepare(config: dict[str, Any]) -> Sender:
    """Build the socket and the batch for ``config`` (see the module docstring)."""
    mode = config["mode"]
    if mode == "up":
        sock = socket.socket(fileno=int(config["fd"]))  # keeps the fd's O_NONBLOCK as is
        packet = udp_packet(config["src"], config["dst_ip"], int(config["sport"]),
                            int(config["dport"]), int(config["ip_len"]))
        probe = TransportBatch(bytes.fromhex(config["key"]), 0, 0, packet, 1)
        capacity = max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // probe.size))
        batch = TransportBatch(bytes.fromhex(config["key"]), int(config["receiver"]),
                               int(config["counter"]), packet, capacity)
        dst = (str(config["dst"][0]), int(config["dst"][1]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        return Sender(sock, dst, batch.fill, batch.size, gso=bool(config.get("gso", True)))
    if mode == "down":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind((str(config["bind"][0]), int(config["bind"][1])))
        _line("BOUND")
        sock.settimeout(float(config.get("wait", 5.0)))
        _, peer = sock.recvfrom(2048)  # the client's trigger, masqueraded by the gateway
        sock.settimeout(None)
        size = int(config["payload_len"])
        plain = PlainBatch(size, max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // size)))
        return Sender(sock, (peer[0], peer[1]), plain.fill, size,
                      gso=bool(config.get("gso", True)))
    raise ValueError(f"unknown mode {mode!r}")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = json.loads(sys.stdin.readline())
    sender = prepare(config)
    _line(f"READY {sender.dst[0]}:{sender.dst[1]}")
    if sys.stdin.readline().strip() != "GO":
        return 1
    cpu = _cpu()
    sent, elapsed = sender.run(float(config["rate"]), float(config["seconds"]))
    _line(json.dumps({"sent": sent, "seconds": elapsed, "gso": sender.gso, "sends": sender.sends,
                      "segments_per_send": sender.per_send, "cpu_s": _cpu() - cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
