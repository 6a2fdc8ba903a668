"""TunActor: owns the TUN device and hands what it reads to each client's data path.

Read path (``handle_tun_input`` in rust/connlib/tunnel/src/gateway.rs): the ``TunReader`` thread
drains the non-blocking device, keeps only packets addressed to a registered client inside the peer
ranges, groups them by client and calls that client's ``deliver`` (its
:class:`~actors.peer_session.PeerSession`) once per batch, on the reader's own thread. No actor
mailbox sits in the read path: a ``tell`` per batch and the hand-off to another thread cost more
than encrypting the packets (bench/README.md). A slow client slows the reader, and the kernel's
queue then drops, which is the backpressure a TUN device has.

Write path: ``TunWriter`` is the device's single writer, handed to whoever produces
packets for the TUN (see its docstring for why it serialises whole batches).

The routing table (client tunnel address bytes -> route) is a dict that only the actor
changes, one key at a time; the reader only does single lookups, so it needs no lock.

Traces: ``wire.dev.recv`` (read from the device) and ``wire.dev.send`` (written to it) log
one DEBUG line per packet (addresses, protocol, size; no payload). The reader and the
writer ask the logger once per batch, so off (the default) they cost nothing per packet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka

from actors.io.ports import TunDevice
from actors.io.tun_linux import READ_SIZE
from gateway.drops import Drop

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())
wire_recv = logging.getLogger("wire.dev.recv")
wire_send = logging.getLogger("wire.dev.send")

READER_THREAD_NAME = "TunReader"
CONFIGURE_THREAD_NAME = "TunConfigure"
#: How long the reader sleeps in poll() at most; the wake pipe normally ends it sooner.
_POLL_TIMEOUT_MS = 500
_JOIN_TIMEOUT = 5.0

# Drop reasons reported by GetTunStats (members of gateway.drops.Drop).
DROP_NOT_IP = Drop.NOT_IP  # not IPv4/IPv6, or shorter than its fixed header
DROP_NOT_PEER_RANGE = Drop.NOT_PEER_RANGE  # destination outside 100.64.0.0/11, fd00:2021:1111::/107
DROP_NO_CLIENT = Drop.NO_CLIENT  # no client registered for the destination
DROP_PEER_ERROR = Drop.PEER_ERROR  # the client's data path raised (a bug; logged)
DROP_WRITE_ERROR = Drop.WRITE_ERROR  # the device refused a write (EAGAIN, ENOBUFS, EINVAL, EIO)
DROP_CLOSED = Drop.CLOSED  # written after the device was closed
DROP_KERNEL = Drop.KERNEL  # the kernel's queue towards our reads was full (device TX drops)

# fd00:2021:1111::/107: 13 whole bytes, then the top 3 bits of byte 13 must be zero.
_V6_PEERS_PREFIX = bytes.fromhex("fd0020211111") + bytes(7)


def describe_packet(packet: bytes) -> str:
    """One packet for a trace line: addresses, protocol and size, never the payload."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        src: object = ipaddress.IPv4Address(packet[12:16])
        dst: object = ipaddress.IPv4Address(packet[16:20])
        protocol = packet[9]
    elif version == 6 and len(packet) >= 40:
        src, dst = ipaddress.IPv6Address(packet[8:24]), ipaddress.IPv6Address(packet[24:40])
        protocol = packet[6]
    else:
        return f"{len(packet)} bytes, not IP"
    return f"{src} -> {dst} protocol {protocol}, {len(packet)} bytes"


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigureInterface:
    """Apply an ``init`` interface (addresses, MTU, rule, routes) to the device."""

    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class RegisterClient:
    """Deliver packets for ``ipv4``/``ipv6`` to ``deliver``; adds to earlier registrations.

    ``deliver`` runs on the reader thread with one client's batch; it must not block.
    """

    client_id: uuid.UUID
    ipv4: str
    ipv6: str
    deliver: Callable[[list[bytes]], None]


@dataclass(frozen=True, slots=True)
class UnregisterClient:
    """Stop delivering packets for every address still mapped to this client."""

    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class GetTunWriter:
    """Ask for the ``TunWriter``."""


@dataclass(frozen=True, slots=True)
class GetTunStats:
    """Ask for ``{"rx_packets": int, "tx_packets": int, "dropped": {reason: int}}``."""


@dataclass(frozen=True, slots=True)
class _ReaderStopped:
    """The reader hit EOF or an unexpected read error; the device is unusable."""

    reason: str


class TunDeviceError(RuntimeError):
    """The TUN device failed underneath us; the actor stops so the app can exit."""


# --- routing table --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Route:
    """Where one client's packets go. Identity-hashed: the reader groups batches by it."""

    client_id: uuid.UUID
    deliver: Callable[[list[bytes]], None]


# --- writer ---------------------------------------------------------------------------


class TunWriter:
    """The single writer of the TUN device; shared by every producer of TUN packets.

    Each batch is written whole under one lock, so one client's packets keep their order
    and batches from different threads never interleave. Firezone saw TCP throughput
    collapse when several threads wrote to the TUN and reordered packets (PR #10231).
    A write the device refuses is dropped and counted, never raised: one bad packet must
    not cost the caller the rest of its batch. After ``close`` writes are dropped too.
    """

    def __init__(self, device: TunDevice) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._closed = False
        self._tx_packets = 0
        self._dropped: dict[str, int] = {DROP_WRITE_ERROR: 0, DROP_CLOSED: 0}

    @property
    def tx_packets(self) -> int:
        return self._tx_packets

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self._dropped)

    def write_batch(self, packets: Iterable[bytes]) -> int:
        """Write ``packets`` in order; returns how many the device accepted."""
        written = failed = 0
        if wire_send.isEnabledFor(logging.DEBUG):
            packets = list(packets)
            for packet in packets:
                wire_send.debug("send %s", describe_packet(packet))
        with self._lock:
            if self._closed:
                self._dropped[DROP_CLOSED] += sum(1 for _ in packets)
                return 0
            write_many = getattr(self._device, "write_many", None)
            if write_many is not None:  # GSO-capable device: runs of one flow per write
                written, failed = write_many(list(packets))
            else:
                write = self._device.write
                for packet in packets:
                    try:
                        write(packet)
                    except OSError:
                        failed += 1
                    else:
                        written += 1
            self._tx_packets += written
            if failed:
                self._dropped[DROP_WRITE_ERROR] += failed
        return written

    def close(self) -> None:
        """Refuse further writes; waits for a batch in progress so the fd can be closed."""
        with self._lock:
            self._closed = True


# --- reader ---------------------------------------------------------------------------


class TunReader(threading.Thread):
    """Drains the device and hands each client's packets to its data path, one call a batch."""

    def __init__(self, device: TunDevice, owner: pykka.ActorRef[Any], batch_size: int) -> None:
        super().__init__(name=READER_THREAD_NAME, daemon=True)
        self._device = device
        self._owner = owner
        self._batch_size = batch_size
        self._stopping = threading.Event()
        self._pipe_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: Replaced (never mutated) by the actor; read once per batch.
        self.routes: dict[bytes, _Route] = {}
        self.rx_packets = 0
        self.dropped: dict[str, int] = {
            reason: 0
            for reason in (
                DROP_NOT_IP,
                DROP_NOT_PEER_RANGE,
                DROP_NO_CLIENT,
                DROP_PEER_ERROR,
            )
        }

    def stop(self) -> None:
        """Ask the thread to finish; wakes it at once through the wake pipe."""
        self._stopping.set()
        with self._pipe_lock, contextlib.suppress(OSError):
            if self._wake_write >= 0:
                os.write(self._wake_write, b"\0")

    def release(self) -> None:
        """Close the wake pipe; idempotent (also covers a reader that never started)."""
        with self._pipe_lock:
            if self._wake_read >= 0:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug: stop the actor rather than read nothing silently
            logger.exception("TUN reader crashed")
            self._report(f"reader crashed: {exc!r}")
        finally:
            self.release()

    def _report(self, failure: str) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self._owner.tell(_ReaderStopped(failure))

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._device.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        device_fd = self._device.fileno()
        while not self._stopping.is_set():
            events = poller.poll(_POLL_TIMEOUT_MS)
            if not events or self._stopping.is_set():
                continue
            failure: str | None = None
            for fd, mask in events:
                if fd == device_fd and mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    failure = f"device poll error (mask {mask:#x})"
            if failure is None:
                try:
                    failure = self._drain()
                except OSError as exc:
                    failure = f"read failed: {exc}"
            if failure is not None:
                if not self._stopping.is_set():
                    logger.error("TUN reader stopped: %s", failure)
                    self._report(failure)
                return

    def _drain(self) -> str | None:
        """Read until EAGAIN in batches; returns why reading must stop, if it must."""
        read = self._device.read
        while not self._stopping.is_set():
            batch: list[bytes] = []
            while len(batch) < self._batch_size:
                packet = read(READ_SIZE)
                if packet is None:
                    break
                if not packet:
                    self._dispatch(batch)
                    return "end of file"
                batch.append(packet)
            self._dispatch(batch)
            if len(batch) < self._batch_size:
                return None
        return None

    def _dispatch(self, packets: list[bytes]) -> None:
        if not packets:
            return
        if wire_recv.isEnabledFor(logging.DEBUG):
            for packet in packets:
                wire_recv.debug("recv %s", describe_packet(packet))
        routes = self.routes
        groups: dict[_Route, list[bytes]] = {}
        not_ip = not_peer_range = no_client = 0
        for packet in packets:
            version = packet[0] >> 4
            if version == 4 and len(packet) >= 20:
                if packet[16] != 100 or packet[17] & 0xE0 != 0x40:
                    not_peer_range += 1
                    continue
                destination = packet[16:20]
            elif version == 6 and len(packet) >= 40:
                if packet[24:37] != _V6_PEERS_PREFIX or packet[37] & 0xE0:
                    not_peer_range += 1
                    continue
                destination = packet[24:40]
            else:
                not_ip += 1
                continue
            route = routes.get(destination)
            if route is None:
                no_client += 1
                continue
            group = groups.get(route)
            if group is None:
                groups[route] = [packet]
            else:
                group.append(packet)

        self.rx_packets += len(packets)
        dropped = self.dropped
        dropped[DROP_NOT_IP] += not_ip
        dropped[DROP_NOT_PEER_RANGE] += not_peer_range
        dropped[DROP_NO_CLIENT] += no_client
        for route, batch in groups.items():
            try:
                route.deliver(batch)
            except Exception:
                # A bug in one client's path must cost that batch, not the reader.
                dropped[DROP_PEER_ERROR] += len(batch)
                logger.exception("TUN reader: client %s dropped a batch", route.client_id)


# --- actor ----------------------------------------------------------------------------


class TunActor(pykka.ThreadingActor):
    """Owns the TUN device: its reader thread, its single writer and the client table."""

    def __init__(
        self,
        *,
        device_factory: Callable[[], TunDevice],
        configure: Callable[[str, str], None] | None = None,
        batch_size: int = 128,
        on_fatal: Callable[[str, int], None] | None = None,
    ) -> None:
        super().__init__()
        #: The process cannot serve without its device: a failure is escalated (exit 1).
        self._on_fatal = on_fatal
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._device_factory = device_factory
        self._configure = configure
        self._batch_size = batch_size
        self._device: TunDevice | None = None
        self._writer: TunWriter | None = None
        self._reader: TunReader | None = None
        self._routes: dict[bytes, _Route] = {}
        self._client_addresses: dict[uuid.UUID, set[bytes]] = {}
        # Interface configuration runs on a worker thread; only the newest request matters.
        self._config_lock = threading.Lock()
        self._pending_config: tuple[str, str] | None = None
        self._config_worker: threading.Thread | None = None

    # lifecycle

    def on_start(self) -> None:
        # Pykka does not call on_failure when on_start raises, so clean up here.
        try:
            self._device = self._device_factory()
            self._writer = TunWriter(self._device)
            self._reader = TunReader(self._device, self.actor_ref, self._batch_size)
            self._reader.routes = self._routes  # shared; the actor updates it in place
            self._reader.start()
        except BaseException:
            self._shutdown()
            raise

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._shutdown()
        if self._on_fatal is not None:
            self._on_fatal(f"TUN actor failed: {exception_value}", 1)

    def _shutdown(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
            if reader.ident is not None:
                reader.join(_JOIN_TIMEOUT)
            if reader.is_alive():
                logger.error("TunReader did not stop within %.0f s", _JOIN_TIMEOUT)
            else:
                reader.release()
        if self._writer is not None:
            self._writer.close()
        device, self._device = self._device, None
        if device is not None:
            try:
                device.close()
            except OSError:
                logger.exception("Closing the TUN device failed")
        worker = self._config_worker
        if worker is not None and worker.is_alive():
            worker.join(_JOIN_TIMEOUT)

    # messages

    def on_receive(self, message: Any) -> Any:
        match message:
            case RegisterClient():
                self._register(message)
            case UnregisterClient(client_id=client_id):
                self._unregister(client_id)
            case ConfigureInterface(ipv4=ipv4, ipv6=ipv6):
                self._request_configuration(ipv4, ipv6)
            case GetTunWriter():
                return self._writer
            case GetTunStats():
                return self._stats()
            case _ReaderStopped(reason=reason):
                raise TunDeviceError(f"TUN device failed: {reason}")
            case _:
                logger.warning("TunActor ignored unexpected message %r", message)
        return None

    def _register(self, message: RegisterClient) -> None:
        try:
            ipv4 = ipaddress.IPv4Address(message.ipv4).packed
            ipv6 = ipaddress.IPv6Address(message.ipv6).packed
        except ValueError as exc:
            logger.warning("Not registering client %s: %s", message.client_id, exc)
            return
        route = _Route(message.client_id, message.deliver)
        addresses = self._client_addresses.setdefault(message.client_id, set())
        addresses.update((ipv4, ipv6))
        routes = self._routes
        for address in (ipv4, ipv6):
            previous = routes.get(address)
            if previous is not None and previous.client_id != message.client_id:
                # The address moved to another client: the old one no longer owns it.
                self._client_addresses.get(previous.client_id, set()).discard(address)
        # In place, one key at a time: the reader only does single dict lookups, which are
        # atomic under the GIL, so it never sees a half-updated table, and a change costs
        # O(1) instead of copying the table (thousands of clients come and go).
        for address in addresses:
            routes[address] = route

    def _unregister(self, client_id: uuid.UUID) -> None:
        routes = self._routes
        for address in self._client_addresses.pop(client_id, set()):
            route = routes.get(address)
            if route is not None and route.client_id == client_id:
                del routes[address]

    def _stats(self) -> dict[str, Any]:
        dropped: dict[str, int] = {}
        rx_packets = tx_packets = 0
        if self._reader is not None:
            rx_packets = self._reader.rx_packets
            dropped.update(self._reader.dropped)
        if self._writer is not None:
            tx_packets = self._writer.tx_packets
            dropped.update(self._writer.dropped)
        kernel_drops = getattr(self._device, "kernel_drops", None)
        if kernel_drops is not None and (count := kernel_drops()) is not None:
            dropped[DROP_KERNEL] = count
        return {"rx_packets": rx_packets, "tx_packets": tx_packets, "dropped": dropped}

    # interface configuration

    def _request_configuration(self, ipv4: str, ipv6: str) -> None:
        """Run ``configure`` off the actor thread: a slow netlink call must not stall it."""
        if self._configure is None:
            logger.debug("No interface configurator; ignoring %s / %s", ipv4, ipv6)
            return
        with self._config_lock:
            self._pending_config = (ipv4, ipv6)
            if self._config_worker is not None:
                return  # the running worker picks up the newest request before it exits
            self._config_worker = threading.Thread(
                target=self._configure_until_idle, name=CONFIGURE_THREAD_NAME, daemon=True
            )
            self._config_worker.start()

    def _configure_until_idle(self) -> None:
        assert self._configure is not None
        while True:
            with self._config_lock:
                pending, self._pending_config = self._pending_config, None
                if pending is None:
                    self._config_worker = None
                    return
            try:
                self._configure(*pending)
            except Exception:
                logger.exception("Configuring the TUN interface failed")
