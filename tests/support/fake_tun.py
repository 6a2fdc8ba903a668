"""An in-memory ``TunDevice`` twin: tests inject packets and collect what was written.

Packets wait in a queue; a socketpair only signals readiness, so the reader thread can
poll the fake exactly like a real fd. ``inject`` publishes a whole list at once, which
lets a test know that one reader wake-up sees all of it (one batch, deterministically).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterable


class FakeTun:
    """``TunDevice`` for tests; thread-safe."""

    def __init__(self) -> None:
        self._signal_rx, self._signal_tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._signal_rx.setblocking(False)
        self._signal_tx.setblocking(False)
        self._lock = threading.Condition()
        self._inbound: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._read_error: Exception | None = None
        self._write_errors: collections.deque[OSError] = collections.deque()
        self.written: list[bytes] = []
        self.closed = False
        self.close_calls = 0

    # TunDevice

    def fileno(self) -> int:
        return self._signal_rx.fileno()

    def read(self, max_size: int) -> bytes | None:
        with self._lock:
            if self._read_error is not None:
                raise self._read_error
            if self._inbound:
                return self._inbound.popleft()[:max_size]
            if self._eof:
                return b""
            self._drain_signal()
            return None

    def write(self, packet: bytes) -> int:
        with self._lock:
            if self.closed:
                raise OSError(9, "Bad file descriptor")
            if self._write_errors:
                raise self._write_errors.popleft()
            self.written.append(bytes(packet))
            self._lock.notify_all()
            return len(packet)

    def close(self) -> None:
        with self._lock:
            self.close_calls += 1
            if not self.closed:
                self.closed = True
                self._signal_rx.close()
                self._signal_tx.close()
            self._lock.notify_all()

    # test side

    def inject(self, packets: Iterable[bytes]) -> None:
        """Make ``packets`` readable, all at once."""
        with self._lock:
            self._inbound.extend(packets)
            self._signal()

    def inject_eof(self) -> None:
        """The next read after the queued packets returns ``b""`` (end of file)."""
        with self._lock:
            self._eof = True
            self._signal()

    def inject_read_error(self, error: Exception) -> None:
        """Every further read raises ``error``."""
        with self._lock:
            self._read_error = error
            self._signal()

    def fail_next_writes(self, *errors: OSError) -> None:
        """The next ``len(errors)`` writes raise these errors, in order."""
        with self._lock:
            self._write_errors.extend(errors)

    def pending(self) -> int:
        """Injected packets not read yet."""
        with self._lock:
            return len(self._inbound)

    def wait_closed(self, timeout: float = 2.0) -> bool:
        """Wait until the owner closed the device."""
        with self._lock:
            return self._lock.wait_for(lambda: self.closed, timeout)

    def wait_written(self, count: int, timeout: float = 2.0) -> list[bytes]:
        """Wait until at least ``count`` packets were written; returns all of them."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.written) >= count, timeout):
                raise TimeoutError(f"{len(self.written)} of {count} packets written")
            return list(self.written)

    def _signal(self) -> None:
        if not self.closed:
            # A full signal queue means the fd is readable already.
            with contextlib.suppress(BlockingIOError):
                self._signal_tx.send(b"\0")

    def _drain_signal(self) -> None:
        while True:
            try:
                self._signal_rx.recv(64)
            except (BlockingIOError, OSError):
                return


def ipv4_checksum(header: bytes) -> int:
    """The RFC 791 checksum (one's complement of the one's complement sum, even length)."""
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_ipv4(src: str, dst: str, payload: bytes, sport: int = 40000, dport: int = 9) -> bytes:
    """A UDP/IPv4 packet with a valid header checksum (UDP checksum 0: "not computed")."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:]
    return header + udp


def udp_ipv6(src: str, dst: str, payload: bytes, sport: int = 40000, dport: int = 9) -> bytes:
    """A UDP/IPv6 packet with a valid UDP checksum (IPv6 forbids a zero one)."""
    source, destination = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    pseudo = source + destination + struct.pack("!IxxxB", length, 17)
    data = pseudo + udp + b"\0" * (len(udp) % 2)
    checksum = ipv4_checksum(data) or 0xFFFF  # the same one's complement sum
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    header = struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, source, destination)
    return header + udp
