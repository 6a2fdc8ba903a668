"""A tiny in-memory TURN relay for simulations (RFC 8656, only what Firezone uses).

Binding, Allocate (401 with nonce first, long-term credentials verified), Refresh,
ChannelBind and ChannelData in both directions. One relayed address per client 5-tuple.
It is a test double, deliberately small; the interop tests cover real coturn.
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
    def __init__(self, address: Address, username: str, password: str, send: Send) -> None:
        self.address = address
        self._key = long_term_key(username, "firezone", password)
        self._username = username
        self._send = send
        self._ports = itertools.count(50000)
        self.allocations: dict[Address, _Allocation] = {}
        self.by_relayed: dict[Address, _Allocation] = {}

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
        if msg.username() != self._username or msg.nonce() is None:
            error = new_response(msg, MessageClass.ERROR).add_error_code(401, "Unauthorized")
            error.add_str(Attr.REALM, "firezone").add_str(Attr.NONCE, "sim-nonce")
            self._send(self.address, src, encode(error))
            return
        if not verify_integrity(data, self._key):
            error = new_response(msg, MessageClass.ERROR).add_error_code(401, "Unauthorized")
            self._send(self.address, src, encode(error))
            return
        reply = new_response(msg, MessageClass.SUCCESS)
        if msg.method == Method.ALLOCATE:
            allocation = self.allocations.get(src)
            if allocation is None:
                relayed = (self.address[0], next(self._ports))
                allocation = _Allocation(src, relayed)
                self.allocations[src] = allocation
                self.by_relayed[relayed] = allocation
            reply.add_xor_address(Attr.XOR_RELAYED_ADDRESS, allocation.relayed)
            reply.add_xor_address(Attr.XOR_MAPPED_ADDRESS, src)
            reply.add_u32(Attr.LIFETIME, 600)
        elif msg.method == Method.REFRESH:
            lifetime = msg.lifetime()
            reply.add_u32(Attr.LIFETIME, 600 if lifetime is None else lifetime)
        elif msg.method == Method.CHANNEL_BIND:
            allocation = self.allocations[src]
            number = msg.channel_number()
            peer = msg.xor_address(Attr.XOR_PEER_ADDRESS)
            assert number is not None and peer is not None
            allocation.channels[number] = peer
        self._send(self.address, src, encode(reply, integrity_key=self._key))
