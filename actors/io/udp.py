"""The node's UDP sockets: one IPv4 and one IPv6 socket, a reader thread, a thread-safe sender.

The reader drains both sockets until they would block and splits each batch two ways:

* WireGuard transport messages (type 4) whose receiver index belongs to a known client go
  straight to that client's PeerActor, one ``tell`` per batch: the data path crosses one
  mailbox and never touches the NodeActor.
* ChannelData from a relay on a channel that carries a client's nominated relayed path,
  wrapping a WireGuard transport message, is unwrapped here and goes the same way; the
  channel is recorded in ``channel_activity`` so the NodeActor can keep the relay's
  channel-refresh bookkeeping (snownet.md §6.5) without seeing the packet.
* Everything else (STUN, other TURN traffic, handshakes, garbage) goes to the NodeActor as
  one batch; the Node core demultiplexes it.

Both hand-offs are bounded by :class:`~actors.backpressure.InFlight`: a slow consumer makes
the reader drop batches instead of growing an inbox without limit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from actors.backpressure import InFlight
from gateway.turn.channel_data import decode_channel_data
from gateway.types import Address

log = logging.getLogger(__name__)
wire_recv = logging.getLogger("wire.net.recv")

#: SO_MARK so our own traffic bypasses the tunnel's policy routing (dataplane.md §2.2).
FIREZONE_MARK = 0xFD002021
SO_MARK = 36
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
#: Larger datagrams are dropped before any processing (MAX_DATAGRAM_PAYLOAD is 1336).
RECV_SIZE = 2048
ANC_SIZE = 256


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """Where the reader sends a client's WireGuard data: its actor and its in-flight bound."""

    tell: Callable[[object], None]
    inflight: InFlight


@dataclass(frozen=True, slots=True)
class FromNetwork:
    """A batch of WireGuard datagrams for one PeerActor: ``(datagram, source)`` pairs."""

    datagrams: list[tuple[bytes, Address]]


@dataclass(frozen=True, slots=True)
class Datagrams:
    """A batch for the NodeActor: ``(local address, source, bytes)`` triples."""

    batch: list[tuple[Address, Address, bytes]]


class UdpSockets:
    """The bound sockets plus a sender usable from any thread (``sendto`` is thread-safe)."""

    def __init__(self, *, port: int = 0, mark: bool = True, ipv6: bool = True) -> None:
        self.v4: socket.socket | None = None
        self.v6: socket.socket | None = None
        self.counters: Counter[str] = Counter()
        self.v4 = self._bind(socket.AF_INET, ("0.0.0.0", port), mark)
        if ipv6:
            self.v6 = self._bind(socket.AF_INET6, ("::", port), mark)
        if self.v4 is None and self.v6 is None:
            raise OSError("no available UDP sockets")

    @staticmethod
    def _bind(family: int, addr: tuple[str, int], mark: bool) -> socket.socket | None:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if mark:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("I", FIREZONE_MARK))
                except OSError as exc:
                    log.warning("cannot set SO_MARK (needs CAP_NET_ADMIN): %s", exc)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            sock.bind(addr)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("failed to bind UDP socket %s: %s", addr, exc)
            return None
        return sock

    def ports(self) -> dict[str, int]:
        out = {}
        if self.v4 is not None:
            out["ipv4"] = self.v4.getsockname()[1]
        if self.v6 is not None:
            out["ipv6"] = self.v6.getsockname()[1]
        return out

    def send(self, dst: Address, payload: bytes) -> None:
        """Send one datagram; errors are counted, never raised (the path may be gone)."""
        sock = self.v6 if ":" in dst[0] else self.v4
        if sock is None:
            self.counters["send_no_socket"] += 1
            return
        try:
            sock.sendto(payload, dst)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.counters["send_would_block"] += 1
            else:
                self.counters[f"send_error_{exc.errno}"] += 1

    def close(self) -> None:
        for sock in (self.v4, self.v6):
            if sock is not None:
                sock.close()


def _local_address(sock: socket.socket, ancdata: list[tuple[int, int, bytes]]) -> Address:
    port = sock.getsockname()[1]
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return (socket.inet_ntop(socket.AF_INET, data[8:12]), port)
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return (socket.inet_ntop(socket.AF_INET6, data[:16]), port)
    return (sock.getsockname()[0], port)


_INDEX = struct.Struct("<I")


class UdpReader(threading.Thread):
    """Drains the sockets and dispatches batches (see the module docstring)."""

    def __init__(
        self,
        sockets: UdpSockets,
        *,
        to_node: Callable[[Datagrams], None],
        node_inflight: InFlight,
        peer_routes: Mapping[int, PeerRoute],
        index_shift: int,
        relay_routes: Mapping[tuple[Address, int], tuple[PeerRoute, Address]] | None = None,
        channel_activity: set[tuple[Address, int]] | None = None,
        batch_size: int = 128,
    ) -> None:
        super().__init__(name="UdpReader", daemon=True)
        self._sockets = [s for s in (sockets.v4, sockets.v6) if s is not None]
        self._to_node = to_node
        self._node_inflight = node_inflight
        self._peer_routes = peer_routes
        self._index_shift = index_shift
        self._relay_routes = relay_routes if relay_routes is not None else {}
        self._channel_activity = channel_activity if channel_activity is not None else set()
        self._batch_size = batch_size
        self._stopping = threading.Event()
        self.counters: Counter[str] = Counter()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select(self._sockets, [], [], 0.2)
            except (OSError, ValueError):
                return  # sockets closed under us: we are being stopped
            for sock in readable:
                try:
                    self._drain(sock)
                except Exception:
                    # A bug must cost one batch, not every datagram from now on.
                    self.counters["reader_error"] += 1
                    log.exception("UDP reader: batch dropped after an unexpected error")

    def _drain(self, sock: socket.socket) -> None:
        node_batch: list[tuple[Address, Address, bytes]] = []
        peer_batches: dict[int, list[tuple[bytes, Address]]] = {}
        routes = self._peer_routes
        relay_routes = self._relay_routes
        activity = self._channel_activity
        shift = self._index_shift
        for _ in range(self._batch_size):
            try:
                data, ancdata, _flags, src = sock.recvmsg(RECV_SIZE, ANC_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self.counters[f"recv_error_{exc.errno}"] += 1
                break
            if len(src) != 2:
                src = (src[0], src[1])  # IPv6: drop flowinfo and scope id
            first = data[0] if data else 0
            # Fast path: WireGuard transport data (type 4 + three zero bytes) for a known index.
            if first == 4 and len(data) >= 32 and data[1:4] == b"\x00\x00\x00":
                key = _INDEX.unpack_from(data, 4)[0] >> shift
                if key in routes:
                    peer_batches.setdefault(key, []).append((data, src))
                    continue
            # Relayed fast path: ChannelData carrying WireGuard transport data.
            elif 0x40 <= first <= 0x7F and relay_routes:
                decoded = decode_channel_data(data)
                if decoded is not None:
                    number, inner = decoded
                    relayed = relay_routes.get((src, number))
                    if (relayed is not None and len(inner) >= 32
                            and inner[:4] == b"\x04\x00\x00\x00"):
                        key = _INDEX.unpack_from(inner, 4)[0] >> shift
                        if key in routes:
                            peer_batches.setdefault(key, []).append((inner, relayed[1]))
                            activity.add((src, number))
                            continue
            node_batch.append((_local_address(sock, ancdata), src, data))
        for key, datagrams in peer_batches.items():
            route = routes.get(key)
            if route is None:
                self.counters["peer_gone"] += len(datagrams)
            elif route.inflight.try_acquire():
                route.tell(FromNetwork(datagrams))
            else:
                self.counters["peer_backpressure_drop"] += len(datagrams)
        if node_batch:
            if self._node_inflight.try_acquire():
                self._to_node(Datagrams(node_batch))
            else:
                self.counters["node_backpressure_drop"] += len(node_batch)
