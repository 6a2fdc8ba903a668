"""Stateful NAT table of DNS-resource translations (dataplane.md §8.2-§8.4).

A session maps an *inside* key ``(kind, client port or ICMP id, proxy IP)`` to an
*outside* key ``(kind, port or id, real IP)``. ``kind`` is the IPv4 protocol number of the
transport (6 TCP, 17 UDP, 1 ICMP echo for both ICMPv4 and ICMPv6, because NAT46/64 turns
one into the other). Only outgoing translations refresh a session, as 1.4 does (a keying
slip there makes incoming packets refresh an unused key), so a session expires 60 s after
the last client -> resource packet.
"""

from __future__ import annotations

NAT_SESSION_TTL = 60.0

Key = tuple[int, int, bytes]


class NatTable:
    """Pure bookkeeping; packet rewriting lives in ``gateway.packet.ip``/``nat46``."""

    def __init__(self) -> None:
        self._outside_of: dict[Key, Key] = {}
        self._inside_of: dict[Key, Key] = {}
        self._last_outgoing: dict[Key, float] = {}

    def translate_outgoing(
        self, kind: int, port: int, proxy_ip: bytes, real_ip: bytes, now: float
    ) -> int | None:
        """The outside port for a client packet to ``proxy_ip`` (now ``real_ip``).

        Reuses the session if it already points at ``real_ip``; otherwise allocates the
        first free port from ``port`` upward, wrapping to 1. None: the port space for
        ``(kind, real_ip)`` is exhausted.
        """
        inside = (kind, port, proxy_ip)
        outside = self._outside_of.get(inside)
        if outside is None or outside[2] != real_ip:
            if outside is not None:
                self._forget(inside, outside)
            allocated = self._free_port(kind, port, real_ip)
            if allocated is None:
                return None
            outside = (kind, allocated, real_ip)
            self._outside_of[inside] = outside
            self._inside_of[outside] = inside
        self._last_outgoing[outside] = now
        return outside[1]

    def translate_incoming(self, kind: int, port: int, real_ip: bytes) -> Key | None:
        """The inside key ``(kind, client port, proxy IP)`` for a reply, if a session exists."""
        return self._inside_of.get((kind, port, real_ip))

    def handle_timeout(self, now: float) -> int:
        """Remove sessions idle (outgoing) for the TTL; returns how many were removed."""
        expired = [
            outside for outside, seen in self._last_outgoing.items()
            if now - seen >= NAT_SESSION_TTL
        ]
        for outside in expired:
            inside = self._inside_of.get(outside)
            if inside is not None:
                self._forget(inside, outside)
            else:
                del self._last_outgoing[outside]
        return len(expired)

    def _forget(self, inside: Key, outside: Key) -> None:
        self._outside_of.pop(inside, None)
        self._inside_of.pop(outside, None)
        self._last_outgoing.pop(outside, None)

    def _free_port(self, kind: int, port: int, real_ip: bytes) -> int | None:
        used = self._inside_of
        for candidate in range(port, 65536):
            if (kind, candidate, real_ip) not in used:
                return candidate
        for candidate in range(1, port):
            if (kind, candidate, real_ip) not in used:
                return candidate
        return None

    def sessions(self) -> list[tuple[Key, Key]]:
        """``(inside, outside)`` pairs, for status output and tests."""
        return list(self._outside_of.items())

    def __len__(self) -> int:
        return len(self._outside_of)
