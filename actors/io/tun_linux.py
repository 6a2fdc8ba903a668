"""The Linux TUN device ``tun-firezone`` (rust/bin-shared/src/tun_device_manager/linux.rs,
rust/tun/src/ioctl.rs).

The device is non-persistent: it exists exactly as long as our fd, so a crash removes it.

It is opened with ``IFF_VNET_HDR`` when the kernel allows: every read and write then
starts with a ``virtio_net_hdr``, which lets :meth:`LinuxTun.write_many` hand the kernel
GSO super-packets (:mod:`gateway.packet.coalesce`) instead of one write per packet. No
offloads are enabled for reads (no ``TUNSETOFFLOAD``), so reads stay one plain packet each.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct

from gateway.packet.coalesce import PLAIN_HEADER, VIRTIO_NET_HDR_LEN, frame, plan

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

TUN_NAME = "tun-firezone"
TUN_PATH = "/dev/net/tun"
TUN_MTU = 1280
#: Big enough for one packet at our MTU plus headroom (Firezone reads into 1316 bytes).
READ_SIZE = 1316

#: The kernel's queue of packets waiting for our reads (the device's txqueuelen). The
#: default of 500 holds 4 ms at 120k packets/s, less than a Python reader may spend off
#: the CPU on a busy host; a full queue drops (``tx_dropped`` of the device). Later
#: Firezone gateways set the same 10,000 (rust/bin-shared tun_device_manager/linux.rs).
TUN_TX_QUEUE_LEN = 10_000

TUNSETIFF = 0x400454CA
SIOCGIFTXQLEN = 0x8942
SIOCSIFTXQLEN = 0x8943
_IFREQ_INT = struct.Struct("16si")
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_TUN_MAJOR, _TUN_MINOR = 10, 200


def ensure_device_node(path: str = TUN_PATH) -> None:
    """Create the TUN char device (and its directory, mode 0751) when a container lacks it."""
    if os.path.exists(path):
        return
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        os.chmod(parent, 0o751)  # makedirs applies the umask; 1.4 makes it exactly 0751
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(_TUN_MAJOR, _TUN_MINOR))
    logger.info("Created missing TUN device node %s", path)


class LinuxTun:
    """An open, non-blocking TUN fd (``TunDevice``); one read or write is one IP packet."""

    def __init__(self, fd: int, name: str, *, vnet_hdr: bool = False) -> None:
        self._fd = fd
        self.name = name
        #: Reads and writes carry a virtio_net_hdr (the fd was opened with IFF_VNET_HDR).
        self.vnet_hdr = vnet_hdr
        #: Cleared for good when the kernel refuses a GSO frame: plain writes from then on.
        self.gso = vnet_hdr
        self.gso_frames = 0

    def fileno(self) -> int:
        return self._fd

    def kernel_drops(self) -> int | None:
        """Packets the kernel dropped on their way to our reads (the device's TX drops,
        nearly all of them a full ``TUN_TX_QUEUE_LEN`` queue); None if unknown."""
        return kernel_tx_drops(self.name)

    def read(self, max_size: int) -> bytes | None:
        try:
            if self.vnet_hdr:
                return os.read(self._fd, max_size + VIRTIO_NET_HDR_LEN)[VIRTIO_NET_HDR_LEN:]
            return os.read(self._fd, max_size)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> int:
        if self.vnet_hdr:
            return os.write(self._fd, PLAIN_HEADER + packet) - VIRTIO_NET_HDR_LEN
        return os.write(self._fd, packet)

    def write_many(self, packets: list[bytes]) -> tuple[int, int]:
        """Write ``packets`` in order, runs of one flow as GSO frames; ``(written, failed)``."""
        if not self.gso:
            return self._write_each(packets)
        written = failed = 0
        fd = self._fd
        for group in plan(packets):
            try:
                os.write(fd, frame(group))
            except OSError as exc:
                if len(group) > 1 and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    logger.warning("TUN refused a GSO frame (%s); writing packets one by one "
                                   "from now on", exc)
                    self.gso = False
                    more, lost = self._write_each(group)
                    written += more
                    failed += lost
                else:
                    failed += len(group)
            else:
                written += len(group)
                if len(group) > 1:
                    self.gso_frames += 1
        return written, failed

    def _write_each(self, packets: list[bytes]) -> tuple[int, int]:
        written = failed = 0
        for packet in packets:
            try:
                self.write(packet)
            except OSError:
                failed += 1
            else:
                written += 1
        return written, failed

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def open_tun(name: str = TUN_NAME, *, path: str = TUN_PATH, vnet_hdr: bool = True) -> LinuxTun:
    """Create the TUN device ``name`` (IFF_TUN | IFF_NO_PI, single queue, O_NONBLOCK).

    With ``vnet_hdr`` it asks for IFF_VNET_HDR too and falls back to a plain device when
    the kernel refuses. Its queue towards us gets ``TUN_TX_QUEUE_LEN`` (a failure there is
    a warning). Raises ``OSError`` (typically EPERM without CAP_NET_ADMIN); callers treat
    it as fatal.
    """
    device = _open_device(name, path=path, vnet_hdr=vnet_hdr)
    try:
        set_tx_queue_len(name, TUN_TX_QUEUE_LEN)
    except OSError as exc:
        logger.warning("Cannot set the txqueuelen of %s to %d (%s); bursts beyond %d packets "
                       "are dropped while the reader is busy", name, TUN_TX_QUEUE_LEN, exc,
                       tx_queue_len(name))
    return device


def tx_queue_len(name: str) -> int:
    """The device's txqueuelen (-1 when it cannot be read), in the caller's namespace."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return int(_IFREQ_INT.unpack(
                fcntl.ioctl(sock, SIOCGIFTXQLEN, _IFREQ_INT.pack(name.encode(), 0)))[1])
    except OSError:
        return -1


def kernel_tx_drops(name: str, dev_table: str = "/proc/thread-self/net/dev") -> int | None:
    """The TX ``drop`` column of ``name`` in the calling thread's namespace, or None."""
    try:
        with open(dev_table) as table:
            for line in table:
                interface, sep, counters = line.partition(":")
                if sep and interface.strip() == name:
                    return int(counters.split()[11])  # 8 receive columns, then bytes..drop
    except (OSError, ValueError, IndexError):
        return None
    return None


def set_tx_queue_len(name: str, length: int) -> None:
    """Set the device's txqueuelen; for a TUN that is the ring of packets awaiting reads."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFTXQLEN, _IFREQ_INT.pack(name.encode(), length))


def _open_device(name: str, *, path: str, vnet_hdr: bool) -> LinuxTun:
    ensure_device_node(path)
    plain = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        try:
            fd = _open_with_flags(path, name, plain | IFF_VNET_HDR)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            logger.info("TUN without IFF_VNET_HDR (%s): one write per packet", exc)
        else:
            logger.info("Opened TUN device %s (GSO writes)", name)
            return LinuxTun(fd, name, vnet_hdr=True)
    fd = _open_with_flags(path, name, plain)
    logger.info("Opened TUN device %s", name)
    return LinuxTun(fd, name)


def _open_with_flags(path: str, name: str, flags: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd
