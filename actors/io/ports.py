"""The IO ports actors depend on, as Protocols, so each has an in-memory twin for tests.

The shells own the real resources (``actors/io/tun_linux.py`` and friends); the tests swap
in fakes from ``tests/support`` that run without root.
"""

from __future__ import annotations

from typing import Protocol


class TunDevice(Protocol):
    """A non-blocking layer-3 device: every read and write is one whole IP packet."""

    def fileno(self) -> int:
        """A descriptor that polls readable when ``read`` has a packet."""
        ...

    def read(self, max_size: int) -> bytes | None:
        """One packet, ``None`` when none is ready (EAGAIN), ``b""`` at end of file."""
        ...

    def write(self, packet: bytes) -> int:
        """Write one packet; raises ``OSError`` (EAGAIN, ENOBUFS, EINVAL, EIO, ...) on failure."""
        ...

    def close(self) -> None:
        """Release the device; idempotent."""
        ...
