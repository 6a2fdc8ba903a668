"""The Linux TUN device ``tun-firezone`` (dataplane spec §2.1).

The device is non-persistent: it exists exactly as long as our fd, so a crash removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct

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

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        return self._fd

    def read(self, max_size: int) -> bytes | None:
        try:
            return os.read(self._fd, max_size)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> int:
        return os.write(self._fd, packet)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def open_tun(name: str = TUN_NAME, *, path: str = TUN_PATH) -> LinuxTun:
    """Create the TUN device ``name`` (IFF_TUN | IFF_NO_PI, single queue, O_NONBLOCK).

    Raises ``OSError`` (typically EPERM without CAP_NET_ADMIN); callers treat it as fatal.
    """
    ensure_device_node(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        request = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, request)
    except BaseException:
        os.close(fd)
        raise
    logger.info("Opened TUN device %s", name)
    return LinuxTun(fd, name)
