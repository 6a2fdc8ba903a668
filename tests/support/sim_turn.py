"""A tiny in-memory TURN relay for simulations (RFC 8656, only what Firezone uses).

Binding, Allocate (401 with nonce first, long-term credentials verified), Refresh (LIFETIME
0 deletes), ChannelBind and ChannelData in both directions. One relayed address per client
5-tuple, owned by the username that made it: like coturn, another username gets 437 for an
ALLOCATE and 441 for anything else on that 5-tuple. It is a test double, deliberately
small; the interop tests cover real coturn.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    encode,
    long_term_key,
    looks_like_stun,
    new_response,
    parse,
    verify_integrity,
)
from gateway.turn.channel_data import decode_channel_data, encode_channel_data
from gateway.types import Address

Send = Callable[[Address, Address, bytes], None]  # (src, dst, payload)


@dataclass
class _Allocation:
    client: Address
    relayed: Address
    channels: dict[int, Address] = field(default_factory=dict)

    def channel_of(self, peer: Address) -> int | None:
        for number, address in self.channels.items():
            if address == peer:
                return number
        return None


class SimTurnServer:
    def __init__(
        self, address: Address, username: str, password: str, send: Send,
        *, accounts: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        #: username -> long-term key; ``accounts`` adds more (the portal rotates them).
        self._keys = {name: long_term_key(name, "firezone", secret)
                      for name, secret in {username: password, **(accounts or {})}.items()}
        self._send = send
        self._ports = itertools.count(50000)
        self.allocations: dict[Address, _Allocation] = {}
        self.by_relayed: dict[Address, _Allocation] = {}
        self.owners: dict[Address, str] = {}
        #: Authenticated requests as (method, username, lifetime, answer code or 0).
        self.log: list[tuple[int, str | None, int | None, int]] = []

    def add_account(self, username: str, password: str) -> None:
        """Accept one more long-term credential (the portal rotates them on every init)."""
        self._keys[username] = long_term_key(username, "firezone", password)

    def restart(self) -> None:
        """The relay went down and came back: every allocation is gone."""
        self.allocations.clear()
        self.by_relayed.clear()
        self.owners.clear()

    def relayed_addresses(self) -> set[Address]:
        return set(self.by_relayed)

    def receive(self, src: Address, dst: Address, data: bytes) -> None:
        if dst == self.address:
            if looks_like_stun(data):
                self._stun(src, data)
            else:
                decoded = decode_channel_data(data)
                allocation = self.allocations.get(src)
                if decoded is None or allocation is None:
                    return
                number, payload = decoded
                peer = allocation.channels.get(number)
                if peer is not None:
                    self._send(allocation.relayed, peer, payload)
            return
        allocation = self.by_relayed.get(dst)
        if allocation is None:
            return
        number = allocation.channel_of(src)
        if number is not None:
            self._send(self.address, allocation.client, encode_channel_data(number, data))

    def _stun(self, src: Address, data: bytes) -> None:
        msg = parse(data)
        if msg.cls != MessageClass.REQUEST:
            return
        if msg.method == Method.BINDING:
            reply = new_response(msg, MessageClass.SUCCESS)
            reply.add_xor_address(Attr.XOR_MAPPED_ADDRESS, src)
            self._send(self.address, src, encode(reply))
            return
        username = msg.username()
        key = self._keys.get(username or "")
        if key is None or msg.nonce() is None:
            self.log.append((msg.method, username, msg.lifetime(), 401))
            error = new_response(msg, MessageClass.ERROR).add_error_code(401, "Unauthorized")
            error.add_str(Attr.REALM, "firezone").add_str(Attr.NONCE, "sim-nonce")
            self._send(self.address, src, encode(error))
            return
        if not verify_integrity(data, key):
            error = new_response(msg, MessageClass.ERROR).add_error_code(401, "Unauthorized")
            self._send(self.address, src, encode(error))
            return
        owner = self.owners.get(src)
        if owner is not None and owner != username:
            code = 437 if msg.method == Method.ALLOCATE else 441
            self.log.append((msg.method, username, msg.lifetime(), code))
            error = new_response(msg, MessageClass.ERROR).add_error_code(code, "Mismatch")
            self._send(self.address, src, encode(error, integrity_key=key))
            return
        self.log.append((msg.method, username, msg.lifetime(), 0))
        reply = new_response(msg, MessageClass.SUCCESS)
        if msg.method == Method.ALLOCATE:
            allocation = self.allocations.get(src)
            if allocation is None:
                relayed = (self.address[0], next(self._ports))
                allocation = _Allocation(src, relayed)
                self.allocations[src] = allocation
                self.by_relayed[relayed] = allocation
                self.owners[src] = username or ""
            reply.add_xor_address(Attr.XOR_RELAYED_ADDRESS, allocation.relayed)
            reply.add_xor_address(Attr.XOR_MAPPED_ADDRESS, src)
            reply.add_u32(Attr.LIFETIME, 600)
        elif msg.method == Method.REFRESH:
            lifetime = msg.lifetime()
            if lifetime == 0 and (gone := self.allocations.pop(src, None)) is not None:
                self.by_relayed.pop(gone.relayed, None)
                self.owners.pop(src, None)
            reply.add_u32(Attr.LIFETIME, 600 if lifetime is None else lifetime)
        elif msg.method == Method.CHANNEL_BIND:
            allocation = self.allocations[src]
            number = msg.channel_number()
            peer = msg.xor_address(Attr.XOR_PEER_ADDRESS)
            assert number is not None and peer is not None
            allocation.channels[number] = peer
        self._send(self.address, src, encode(reply, integrity_key=key))
