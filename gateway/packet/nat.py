"""Stateful NAT table of DNS-resource translations (rust/connlib/tunnel/src/peer/nat_table.rs).

A session maps an *inside* key ``(kind, client port or ICMP id, proxy IP)`` to an
*outside* key ``(kind, port or id, real IP)``. ``kind`` is the IPv4 protocol number of the
transport (6 TCP, 17 UDP, 1 ICMP echo for both ICMPv4 and ICMPv6, because NAT46/64 turns
one into the other). Only outgoing translations refresh a session, as 1.4 does (a keying
slip there makes incoming packets refresh an unused key), so a session expires 60 s after
the last client -> resource packet.

Port choice is 1.4's (``rust/connlib/tunnel/src/peer/nat_table.rs``): the first free port
from the client's own port upward, wrapping to the bottom of the range. 1.4 finds it by
probing port after port, so once a real address's 65,535 ports are taken every new flow
costs a full scan (milliseconds) on the thread that also carries every other client's
packets. Here each ``(kind, real IP)`` has a :class:`PortSpace`, a two-level bitmap (256
blocks of 256 ports, plus one bit per full block) in which "first free port at or after
p" is a handful of big-integer operations whatever the occupancy, and a count that
answers "exhausted" at once. Allocation and release are O(1).

Bounds: ``max_sessions`` sessions per table (one table per client); past it a new flow is
refused (``NAT_LIMIT``) until sessions expire. The port range is a parameter so that tests
can exhaust it with a few flows.
"""

from __future__ import annotations

from gateway.errors import InvalidArgument

NAT_SESSION_TTL = 60.0
#: Sessions per client (about 400 bytes each): far above a browser's concurrent flows to
#: DNS resources within the 60 s TTL, and a bounded memory cost per client.
NAT_MAX_SESSIONS = 16384
#: 1.4's port range (0 is only ever kept, never chosen).
NAT_PORTS = (1, 65535)
#: ``translate_outgoing`` results that are not ports.
NAT_EXHAUSTED = -1
NAT_LIMIT = -2

Key = tuple[int, int, bytes]

_BLOCK_BITS = 8
_BLOCK = 1 << _BLOCK_BITS  # ports per block
_BLOCKS = 65536 >> _BLOCK_BITS
_BLOCK_MASK = (1 << _BLOCK) - 1
_ALL_BLOCKS = (1 << _BLOCKS) - 1


def _lowest_bit(value: int) -> int:
    return (value & -value).bit_length() - 1


class _Window:
    """The ports a table may choose, as per-block masks of the ports it may not."""

    __slots__ = ("full", "high", "low", "reserved", "size")

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high <= 65535:
            raise InvalidArgument(f"NAT port range {low}-{high} is not within 1-65535")
        self.low = low
        self.high = high
        self.size = high - low + 1
        # Outside the window counts as used. Port 0 is reserved too unless the window
        # starts at 1: 1.4 keeps a client's port 0 but never allocates it.
        self.reserved = [0] * _BLOCKS
        for port in [*range(0 if low > 1 else 1, low), *range(high + 1, 65536)]:
            self.reserved[port >> _BLOCK_BITS] |= 1 << (port & (_BLOCK - 1))
        self.full = 0
        for block, bits in enumerate(self.reserved):
            if bits == _BLOCK_MASK:
                self.full |= 1 << block


class PortSpace:
    """The used ports of one ``(kind, real IP)``: O(1) allocate, release and "exhausted"."""

    __slots__ = ("_blocks", "_full", "_window", "used")

    def __init__(self, window: _Window) -> None:
        self._window = window
        self._blocks: dict[int, int] = {}  # block -> used bits (absent: none used)
        self._full = window.full
        #: ports in use inside the window
        self.used = 0

    def free(self) -> int:
        """How many ports of the window are still free."""
        return self._window.size - self.used

    def _bits(self, block: int) -> int:
        return self._blocks.get(block, 0) | self._window.reserved[block]

    def _first_free(self, start: int) -> int | None:
        """The lowest free port >= ``start``; a fixed number of integer operations."""
        block = start >> _BLOCK_BITS
        free = ~self._bits(block) & _BLOCK_MASK & ~((1 << (start & (_BLOCK - 1))) - 1)
        if free:
            return (block << _BLOCK_BITS) | _lowest_bit(free)
        later = ~self._full & _ALL_BLOCKS & ~((2 << block) - 1)
        if not later:
            return None
        block = _lowest_bit(later)
        return (block << _BLOCK_BITS) | _lowest_bit(~self._bits(block) & _BLOCK_MASK)

    def allocate(self, port: int) -> int | None:
        """``port`` if free, else the next free one upward, wrapping; None if exhausted."""
        window = self._window
        if self.used >= window.size and not (port == 0 and window.low == 1
                                             and not self._bits(0) & 1):
            return None
        found = self._first_free(port)
        if found is None and port > 0:
            found = self._first_free(window.low)
        if found is None:  # pragma: no cover - the count above says there is one
            return None
        block = found >> _BLOCK_BITS
        bits = self._blocks.get(block, 0) | (1 << (found & (_BLOCK - 1)))
        self._blocks[block] = bits
        if bits | window.reserved[block] == _BLOCK_MASK:
            self._full |= 1 << block
        if window.low <= found <= window.high:
            self.used += 1
        return found

    def release(self, port: int) -> None:
        block = port >> _BLOCK_BITS
        bits = self._blocks.get(block, 0)
        bit = 1 << (port & (_BLOCK - 1))
        if not bits & bit:
            return
        bits &= ~bit
        if bits:
            self._blocks[block] = bits
        else:
            del self._blocks[block]
        self._full &= ~(1 << block)
        window = self._window
        if window.low <= port <= window.high:
            self.used -= 1

    def is_empty(self) -> bool:
        return not self._blocks


class NatTable:
    """Pure bookkeeping; packet rewriting lives in ``gateway.packet.ip``/``nat46``."""

    def __init__(
        self, *, ports: tuple[int, int] = NAT_PORTS, max_sessions: int = NAT_MAX_SESSIONS
    ) -> None:
        self._window = _Window(*ports)
        self._max_sessions = max_sessions
        self._outside_of: dict[Key, Key] = {}
        self._inside_of: dict[Key, Key] = {}
        self._last_outgoing: dict[Key, float] = {}
        self._spaces: dict[tuple[int, bytes], PortSpace] = {}

    def translate_outgoing(
        self, kind: int, port: int, proxy_ip: bytes, real_ip: bytes, now: float
    ) -> int:
        """The outside port for a client packet to ``proxy_ip`` (now ``real_ip``).

        Reuses the session if it already points at ``real_ip``; otherwise allocates the
        first free port from ``port`` upward, wrapping to the bottom of the range.
        ``NAT_EXHAUSTED``: the port space of ``(kind, real_ip)`` is used up;
        ``NAT_LIMIT``: this table holds ``max_sessions`` sessions.
        """
        inside = (kind, port, proxy_ip)
        outside = self._outside_of.get(inside)
        if outside is None or outside[2] != real_ip:
            if outside is not None:
                self._forget(inside, outside)
            elif len(self._outside_of) >= self._max_sessions:
                return NAT_LIMIT
            space = self._spaces.get((kind, real_ip))
            if space is None:
                space = self._spaces[(kind, real_ip)] = PortSpace(self._window)
            allocated = space.allocate(port)
            if allocated is None:
                return NAT_EXHAUSTED
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

    def port_space(self, kind: int, real_ip: bytes) -> PortSpace | None:
        """The used ports towards ``(kind, real_ip)``, for tests and status."""
        return self._spaces.get((kind, real_ip))

    def _forget(self, inside: Key, outside: Key) -> None:
        self._outside_of.pop(inside, None)
        if self._inside_of.pop(outside, None) is not None:
            key = (outside[0], outside[2])
            space = self._spaces.get(key)
            if space is not None:
                space.release(outside[1])
                if space.is_empty():
                    del self._spaces[key]
        self._last_outgoing.pop(outside, None)

    def sessions(self) -> list[tuple[Key, Key]]:
        """``(inside, outside)`` pairs, for status output and tests."""
        return list(self._outside_of.items())

    def __len__(self) -> int:
        return len(self._outside_of)
