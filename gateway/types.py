"""Small value types shared by every core."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeAlias

#: A UDP endpoint as the socket module spells it: ``(ip, port)``; IPv6 without brackets.
Address: TypeAlias = tuple[str, int]

#: Randomness is injected. Production passes ``random.SystemRandom()`` (which draws from
#: the OS CSPRNG, also for ``randbytes``); tests pass a seeded ``random.Random``.
Rng: TypeAlias = random.Random


@dataclass(frozen=True, slots=True)
class Transmit:
    """A datagram a core wants sent.

    ``src`` is the local address to send from (``None``: let the kernel choose);
    ``dst`` the destination; ``payload`` the bytes.
    """

    src: Address | None
    dst: Address
    payload: bytes


def format_address(addr: Address) -> str:
    """``ip:port`` with IPv6 in brackets, as the portal and SDP-free logs spell it."""
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
