"""The node's UDP sockets: one IPv4 and one IPv6 socket, a reader thread, a thread-safe sender.

The reader drains both sockets until they would block and splits each batch two ways:

* WireGuard transport messages (type 4) whose receiver index belongs to a known client go
  straight to that client's data path (``PeerRoute.deliver``, a
  :class:`~actors.peer_session.PeerSession`), called on this thread once per batch: the
  data path crosses no mailbox and never touches the NodeActor.
* ChannelData from a relay on a channel that carries a client's nominated relayed path
  (``relay_routes``: (relay server, channel) -> the client's address behind the relay),
  wrapping a WireGuard transport message, is unwrapped here and goes the same way; the
  channel is recorded in ``channel_activity`` so the NodeActor can keep the relay's
  channel-refresh bookkeeping (rust/connlib/snownet/src/allocation.rs) without seeing the packet.
  The NodeActor takes notes out with ``set.pop`` (atomic), never by copying then clearing the set.

The rules (what is transport data, its route key, the ChannelData unwrap) are
``gateway/demux.py``'s; the tables are filled from the route commands of the gateway core
(``gateway/gateway.py``).
* Everything else (STUN, other TURN traffic, handshakes, garbage) goes to the node as one
  batch through ``to_node``, called on this thread. The NodeActor submits it as a step on
  its combining lock (:mod:`actors.combining`), which bounds what may queue: a mailbox hop
  per STUN message cost more than handling it.

Syscalls are the larger part of a packet's cost, so both directions batch them where the
kernel allows: the sockets ask for UDP GRO (one ``recvmsg`` returns a train of same-size
datagrams from one sender) and :meth:`UdpSockets.send_many` uses UDP GSO (one ``sendmsg``
carries a run of same-size datagrams to one destination).

Traces: ``wire.net.recv`` logs each ``recvmsg`` (source, local address, size, GRO
segments) and ``wire.net.send`` each send (destination, local source, sizes), at DEBUG,
no payload. Off (the default) they cost one test of a local per ``recvmsg`` (the reader
asks the logger once per drain) and one attribute test per send: :attr:`UdpSockets.trace`
is refreshed by the reader at every wake-up (at least once a second).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from gateway.demux import MAX_DATAGRAM_PAYLOAD, relayed_transport, transport_key
from gateway.drops import Drop, Event
from gateway.types import Address, format_address

log = logging.getLogger(__name__)
wire_recv = logging.getLogger("wire.net.recv")
wire_send = logging.getLogger("wire.net.send")

#: SO_MARK so our own traffic bypasses the tunnel's policy routing
#: (rust/bin-shared/src/tun_device_manager/linux.rs).
FIREZONE_MARK = 0xFD002021
SO_MARK = 36
#: Like SO_RCVBUF/SO_SNDBUF but past net.core.rmem_max/wmem_max (needs CAP_NET_ADMIN,
#: which the gateway has): a stock host caps plain requests at 208 KiB, a few ms at 120k
#: packets/s. Later Firezone gateways raise the sysctls instead (1.4.17).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
#: 4 MiB each (the kernel doubles it for its bookkeeping): about 30 ms of a 120k
#: packets/s burst while the reader is off the CPU. Deeper would only delay every client's
#: ICE checks and handshakes behind queued data under sustained overload.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: One GRO train at most (a single datagram is never larger than MAX_DATAGRAM_PAYLOAD 1336).
RECV_SIZE = 65535
ANC_SIZE = 256
#: The kernel's limit of segments per GSO send (UDP_MAX_SEGMENTS is 64 on older kernels).
GSO_MAX_SEGMENTS = 64
#: A GSO send's payload must fit one IPv4/IPv6 UDP datagram.
GSO_MAX_BYTES = 65000


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """Where the reader hands a client's WireGuard data: ``(datagram, source)`` batches.

    ``deliver`` runs on the reader thread and must not block.
    """

    deliver: Callable[[list[tuple[bytes, Address]]], None]


@dataclass(frozen=True, slots=True)
class FromNetwork:
    """WireGuard datagrams the NodeActor demultiplexed for a PeerActor (handshakes)."""

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
        #: Cleared for good when the kernel refuses a GSO send (old kernel, odd device).
        self.gso = True
        #: Whether ``wire.net.send`` traces; refreshed by the reader (see the module doc).
        self.trace = False
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
            _set_buffers(sock, SOCKET_BUFFER_BYTES)
            with contextlib.suppress(OSError):  # kernels before 5.0 read one datagram a call
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            sock.bind(addr)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("failed to bind UDP socket %s: %s", addr, exc)
            return None
        return sock

    def buffer_sizes(self) -> dict[str, tuple[int, int]]:
        """(receive, send) buffer bytes per family as the kernel granted them."""
        return {
            family: (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                     sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            for family, sock in (("ipv4", self.v4), ("ipv6", self.v6)) if sock is not None
        }

    def ports(self) -> dict[str, int]:
        out = {}
        if self.v4 is not None:
            out["ipv4"] = self.v4.getsockname()[1]
        if self.v6 is not None:
            out["ipv6"] = self.v6.getsockname()[1]
        return out

    def send(self, dst: Address, payload: bytes, src: Address | None = None) -> None:
        """Send one datagram, from local address ``src`` if given
        (rust/connlib/snownet/src/node.rs: a direct path sends from its base); errors are counted,
        never raised (the path may be gone).
        """
        sock = self.v6 if ":" in dst[0] else self.v4
        if sock is None:
            self.counters[Drop.SEND_NO_SOCKET] += 1
            return
        if self.trace:
            _trace_send(dst, src, [payload])
        source = _source_control(src, dst)
        try:
            if source is None:
                sock.sendto(payload, dst)
            else:
                sock.sendmsg([payload], [source], 0, dst)
        except OSError as exc:
            if source is not None and exc.errno in _SOURCE_REFUSALS:
                self.counters[Drop.SEND_SOURCE_REFUSED] += 1  # no longer ours: kernel's choice
                self.send(dst, payload)
            elif exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.counters[Drop.SEND_WOULD_BLOCK] += 1
            else:
                self.counters[f"send_error_{exc.errno}"] += 1

    def send_many(self, dst: Address, payloads: list[bytes], src: Address | None = None) -> None:
        """Send datagrams in order (from ``src``, as :meth:`send`); runs of equal size go
        out as one GSO ``sendmsg``."""
        if len(payloads) < 2 or not self.gso:
            for payload in payloads:
                self.send(dst, payload, src)
            return
        sock = self.v6 if ":" in dst[0] else self.v4
        if sock is None:
            self.counters[Drop.SEND_NO_SOCKET] += len(payloads)
            return
        if self.trace:
            _trace_send(dst, src, payloads)
        try:
            send_segmented(sock, dst, payloads, self.counters, _source_control(src, dst))
        except SourceRefused as exc:
            self.counters[Drop.SEND_SOURCE_REFUSED] += 1
            self.send_many(dst, payloads[exc.sent:])  # EINVAL may also mean GSO: see there
        except GsoRefused as exc:
            log.warning("UDP GSO refused (%s); sending one datagram per call from now on", exc)
            self.gso = False
            for payload in payloads[exc.sent:]:
                self.send(dst, payload, src)

    def close(self) -> None:
        for sock in (self.v4, self.v6):
            if sock is not None:
                sock.close()


def _trace_send(dst: Address, src: Address | None, payloads: list[bytes]) -> None:
    sizes = sorted({len(p) for p in payloads})
    wire_send.debug("send %s -> %s: %d datagram(s), %s bytes",
                    format_address(src) if src is not None else "*", format_address(dst),
                    len(payloads), "/".join(map(str, sizes)))


def _set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte buffers, past the host's limits where we may (see SO_RCVBUFFORCE)."""
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:  # no CAP_NET_ADMIN: as much as net.core.[rw]mem_max allows
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _local_address(
    sock: socket.socket, port: int, ancdata: list[tuple[int, int, bytes]]
) -> Address:
    """The address a datagram was sent to: our port, and the IP from its packet info."""
    for level, kind, data in ancdata:
        if level == SOL_UDP:
            continue
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return (socket.inet_ntop(socket.AF_INET, data[8:12]), port)
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return (socket.inet_ntop(socket.AF_INET6, data[:16]), port)
    return (sock.getsockname()[0], port)


#: What the kernel answers a source address that is not (or no longer) one of ours: the
#: route lookup with that source fails (ENETUNREACH, or EINVAL/EADDRNOTAVAIL). A truly
#: unreachable destination fails the retry without source the same way, and is counted.
_SOURCE_REFUSALS = (errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH)
#: A control message for ``sendmsg``: (level, type, data).
Control = tuple[int, int, bytes]
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst (the source to use), addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr (the source to use), ifindex


@lru_cache(maxsize=256)
def _pktinfo(ip: str) -> Control | None:
    """The control message that makes a send leave from local address ``ip``."""
    try:
        if ":" in ip:
            packed = socket.inet_pton(socket.AF_INET6, ip)
            return socket.IPPROTO_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(packed, 0)
        packed = socket.inet_pton(socket.AF_INET, ip)
        return socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, packed, bytes(4))
    except OSError:
        return None


def _source_control(src: Address | None, dst: Address) -> Control | None:
    """IP_PKTINFO/IPV6_PKTINFO for sending from ``src`` to ``dst``; None: kernel's choice
    (no source, another family, or unspecified)."""
    if src is None or (":" in src[0]) != (":" in dst[0]) or src[0] in ("0.0.0.0", "::"):
        return None
    return _pktinfo(src[0])


_SEGMENT = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
_GSO_REFUSALS = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


class _SendRefused(OSError):
    """A send the kernel refused for good; ``sent`` datagrams had gone out before."""

    def __init__(self, cause: OSError, sent: int) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.sent = sent


class GsoRefused(_SendRefused):
    """The kernel does not do UDP GSO here."""


class SourceRefused(_SendRefused):
    """The source address was refused (or, with GSO, EINVAL that may mean either)."""


def send_segmented(
    sock: socket.socket,
    dst: Address,
    payloads: list[bytes],
    counters: Counter[str],
    source: Control | None = None,
) -> None:
    """Send ``payloads`` in order to ``dst``, each run of equal sizes as one GSO ``sendmsg``,
    with the ``source`` control message (IP_PKTINFO) if given.

    Transient errors are counted (the datagrams are lost, as UDP may lose them); a refusal
    of the source raises :class:`SourceRefused`, of GSO itself :class:`GsoRefused` (the
    kernel answers EINVAL to both, so the caller retries without the source first).
    """
    extra = [source] if source is not None else []
    start, count = 0, len(payloads)
    while start < count:
        size = len(payloads[start])
        end = start + 1
        limit = min(count, start + GSO_MAX_SEGMENTS, start + max(1, GSO_MAX_BYTES // size))
        while end < limit and len(payloads[end]) == size:
            end += 1
        if end < limit and len(payloads[end]) < size:
            end += 1  # the last segment of a GSO send may be shorter
        try:
            if end - start == 1:
                if extra:
                    sock.sendmsg([payloads[start]], extra, 0, dst)
                else:
                    sock.sendto(payloads[start], dst)
            else:
                control = [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size)), *extra]
                sock.sendmsg([b"".join(payloads[start:end])], control, 0, dst)
        except OSError as exc:
            if extra and exc.errno in _SOURCE_REFUSALS:
                raise SourceRefused(exc, start) from exc
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                counters[Drop.SEND_WOULD_BLOCK] += end - start
            elif end - start > 1 and exc.errno in _GSO_REFUSALS:
                raise GsoRefused(exc, start) from exc
            else:
                counters[f"send_error_{exc.errno}"] += end - start
        start = end


def split_gro(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes] | None:
    """The datagrams of a GRO train, or None when ``data`` is a single datagram."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size = _GRO_SIZE.unpack_from(value)[0]
            if 0 < size < len(data):
                return [data[i:i + size] for i in range(0, len(data), size)]
    return None


class UdpReader(threading.Thread):
    """Drains the sockets and dispatches batches (see the module docstring)."""

    def __init__(
        self,
        sockets: UdpSockets,
        *,
        to_node: Callable[[Datagrams], None],
        peer_routes: Mapping[int, PeerRoute],
        index_shift: int,
        relay_routes: Mapping[tuple[Address, int], Address] | None = None,
        channel_activity: set[tuple[Address, int]] | None = None,
        batch_size: int = 128,
    ) -> None:
        super().__init__(name="UdpReader", daemon=True)
        self._udp = sockets
        self._sockets = [s for s in (sockets.v4, sockets.v6) if s is not None]
        # Bound before the reader starts and never rebound (a reset makes new sockets).
        self._ports = {sock: sock.getsockname()[1] for sock in self._sockets}
        self._to_node = to_node
        self._peer_routes = peer_routes
        self._index_shift = index_shift
        self._relay_routes = relay_routes if relay_routes is not None else {}
        self._channel_activity = channel_activity if channel_activity is not None else set()
        self._batch_size = batch_size
        self._stopping = threading.Event()
        # stop() writes here so the reader leaves select() at once (reset latency).
        self._wake_read, self._wake_write = os.pipe()
        self._wake_lock = threading.Lock()  # no write to a closed (maybe reused) fd
        self._wake_open = True
        self.counters: Counter[str] = Counter()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        with self._wake_lock, contextlib.suppress(OSError):
            if self._wake_open:
                os.write(self._wake_write, b"x")

    def run(self) -> None:
        try:
            self._loop()
        finally:
            with self._wake_lock:
                self._wake_open = False
                os.close(self._wake_read)
                os.close(self._wake_write)

    def _loop(self) -> None:
        by_fd = {sock.fileno(): sock for sock in self._sockets}
        watched = [*by_fd, self._wake_read]
        while not self._stopping.is_set():
            self._udp.trace = wire_send.isEnabledFor(logging.DEBUG)
            try:
                readable, _, _ = select.select(watched, [], [], 1.0)
            except (OSError, ValueError):
                return  # sockets closed under us: we are being stopped
            for fd in readable:
                if fd == self._wake_read or self._stopping.is_set():
                    return
                try:
                    self._drain(by_fd[fd])
                except Exception:
                    # A bug must cost one batch, not every datagram from now on.
                    self.counters[Drop.READER_ERROR] += 1
                    log.exception("UDP reader: batch dropped after an unexpected error")

    def _drain(self, sock: socket.socket) -> None:
        node_batch: list[tuple[Address, Address, bytes]] = []
        peer_batches: dict[int, list[tuple[bytes, Address]]] = {}
        trace = wire_recv.isEnabledFor(logging.DEBUG)
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
            if trace:
                self._trace_recv(sock, data, ancdata, src)
            if ancdata and (train := split_gro(data, ancdata)) is not None:
                self.counters[Event.GRO_TRAINS] += 1
                self._sort_train(sock, train, ancdata, src, peer_batches, node_batch)
            else:
                self._sort(sock, data, ancdata, src, peer_batches, node_batch)
        routes = self._peer_routes
        for key, datagrams in peer_batches.items():
            route = routes.get(key)
            if route is None:
                self.counters[Drop.PEER_GONE] += len(datagrams)
                continue
            try:
                route.deliver(datagrams)
            except Exception:
                # A bug in one client's path must cost that batch, not everyone's.
                self.counters[Drop.PEER_ERROR] += len(datagrams)
                log.exception("UDP reader: a client's batch was dropped")
        if node_batch:
            self._to_node(Datagrams(node_batch))

    def _trace_recv(
        self, sock: socket.socket, data: bytes, ancdata: list[tuple[int, int, bytes]],
        src: Address,
    ) -> None:
        train = split_gro(data, ancdata) if ancdata else None
        wire_recv.debug(
            "recv %s -> %s: %d bytes%s", format_address(src),
            format_address(_local_address(sock, self._ports[sock], ancdata)), len(data),
            f" in {len(train)} GRO segments" if train is not None else "",
        )

    def _sort_train(
        self,
        sock: socket.socket,
        train: list[bytes],
        ancdata: list[tuple[int, int, bytes]],
        src: Address,
        peer_batches: dict[int, list[tuple[bytes, Address]]],
        node_batch: list[tuple[Address, Address, bytes]],
    ) -> None:
        """A GRO train: one sender, in bulk usually one client's transport data back to
        back. Once the first datagram went to a client's batch, the others whose type and
        receiver index (their first 8 bytes) are the same follow it without a lookup each;
        any other goes through :meth:`_sort`."""
        first = train[0]
        if len(first) > MAX_DATAGRAM_PAYLOAD:  # only the last may be shorter: one by one
            for datagram in train:
                self._sort(sock, datagram, ancdata, src, peer_batches, node_batch)
            return
        self._sort(sock, first, ancdata, src, peer_batches, node_batch)
        key = transport_key(first, self._index_shift)
        batch = peer_batches.get(key) if key is not None else None
        head = first[:8]
        for datagram in train[1:]:
            if batch is not None and datagram[:8] == head and len(datagram) >= 32:
                batch.append((datagram, src))
            else:
                self._sort(sock, datagram, ancdata, src, peer_batches, node_batch)

    def _sort(
        self,
        sock: socket.socket,
        data: bytes,
        ancdata: list[tuple[int, int, bytes]],
        src: Address,
        peer_batches: dict[int, list[tuple[bytes, Address]]],
        node_batch: list[tuple[Address, Address, bytes]],
    ) -> None:
        """Put one datagram on its client's batch (fast paths) or on the node's; the rules
        are ``gateway/demux.py``'s, the tables the gateway core's published routes."""
        # Dropped before any processing (rust/connlib/snownet/src/allocation.rs).
        if len(data) > MAX_DATAGRAM_PAYLOAD:
            self.counters[Drop.OVERSIZED] += 1
            return
        # Fast path: WireGuard transport data for a known receiver index.
        key = transport_key(data, self._index_shift)
        if key is not None:
            if key in self._peer_routes:
                batch = peer_batches.get(key)
                if batch is None:
                    peer_batches[key] = [(data, src)]
                else:
                    batch.append((data, src))
                return
        # Relayed fast path: ChannelData carrying WireGuard transport data.
        elif self._relay_routes and (
            relayed := relayed_transport(data, self._index_shift)
        ) is not None:
            number, key, inner = relayed
            remote = self._relay_routes.get((src, number))
            if remote is not None and key in self._peer_routes:
                peer_batches.setdefault(key, []).append((inner, remote))
                self._channel_activity.add((src, number))
                return
        node_batch.append((_local_address(sock, self._ports[sock], ancdata), src, data))
