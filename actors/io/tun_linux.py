"""The Linux TUN device ``tun-firezone`` (dataplane spec §2.1).

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

TUNSETIFF = 0x400454CA
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
        os.chmod(parent, 0o751)  # makedirs applies the umask; the spec wants exactly 0751
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
    the kernel refuses. Raises ``OSError`` (typically EPERM without CAP_NET_ADMIN);
    callers treat it as fatal.
    """
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
