"""The command channel: a FIFO the tests write lines into (``roam``, ``request X``, ``quit``).

The FIFO is opened for reading *and* writing so that it never reports end-of-file when a
writer (``echo roam > fifo``) goes away: the loop can keep it in its select set forever.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Roam:
    """Discard connections, rebind the UDP socket on a new port, re-request every flow."""


@dataclass(frozen=True, slots=True)
class Request:
    resource: str


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Inject:
    """Encrypt this raw IP packet to the gateway serving ``resource``, bypassing our own
    routing: tests use it to send what a well-behaved client never would (a forged source,
    a destination the gateway has not authorized) and watch the gateway drop it."""

    resource: str
    packet: bytes


Command = Roam | Request | Quit | Inject


def parse_command(line: str) -> Command:
    """Parse one command line; ``ValueError`` names what is wrong."""
    words = line.split()
    if not words:
        raise ValueError("empty command")
    verb, args = words[0].lower(), words[1:]
    if verb == "roam" and not args:
        return Roam()
    if verb == "quit" and not args:
        return Quit()
    if verb == "request" and len(args) == 1:
        return Request(args[0])
    if verb == "inject" and len(args) == 2:
        try:
            return Inject(args[0], bytes.fromhex(args[1]))
        except ValueError:
            raise ValueError("inject: expected <resource> <packet as hex>") from None
    raise ValueError(
        f"unknown command {line.strip()!r} "
        "(roam | request <resource> | inject <resource> <hex> | quit)"
    )


class CommandFifo:
    """Non-blocking line reader over a named pipe (created when missing)."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            os.mkfifo(path, 0o600)
        elif not stat.S_ISFIFO(os.stat(path).st_mode):
            raise ValueError(f"{path} exists and is not a FIFO")
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buffer = b""

    def fileno(self) -> int:
        return self._fd

    def read_lines(self) -> list[str]:
        """Every complete line available now."""
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines if line.strip()]

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
