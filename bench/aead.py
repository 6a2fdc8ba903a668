"""AEAD micro-benchmark for the WireGuard transport path.

Run: ``python -m bench.aead [--packets N] [--repeat R] [--size BYTES]``. Prints the best
(minimum over repeats) microseconds per encrypt and per decrypt of one packet for each
option. Not a test: timings depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter
from gateway.wg.tunnel import Tunnel, WriteToNetwork, WriteToTunnel

NONCE = bytes(4) + (12345).to_bytes(8, "little")


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Minimum over ``repeat`` runs of the per-call time of ``fn``, in microseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def bench_primitives(size: int, number: int, repeat: int) -> list[tuple[str, float, float]]:
    key = os.urandom(32)
    padded = os.urandom(size + (-size & 15))
    rows = []

    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(padded, None, NONCE, key)
    rows.append((
        "nacl.bindings chacha20poly1305_ietf",
        best_us(lambda: crypto_aead_chacha20poly1305_ietf_encrypt(padded, None, NONCE, key),
                number, repeat),
        best_us(lambda: crypto_aead_chacha20poly1305_ietf_decrypt(sealed, None, NONCE, key),
                number, repeat),
    ))  # fmt: skip

    aead = ChaCha20Poly1305(key)
    sealed = aead.encrypt(NONCE, padded, None)
    rows.append((
        "cryptography encrypt/decrypt",
        best_us(lambda: aead.encrypt(NONCE, padded, None), number, repeat),
        best_us(lambda: aead.decrypt(NONCE, sealed, None), number, repeat),
    ))  # fmt: skip

    out = bytearray(len(padded) + 16)
    back = bytearray(len(padded))
    rows.append((
        "cryptography *_into (preallocated)",
        best_us(lambda: aead.encrypt_into(NONCE, padded, None, out), number, repeat),
        best_us(lambda: aead.decrypt_into(NONCE, sealed, None, back), number, repeat),
    ))  # fmt: skip

    # What a transport path must add around *_into to hand out ``bytes`` with a header.
    view = memoryview(out)
    frame = bytearray(16 + len(padded) + 16)
    frame_view = memoryview(frame)

    def into_then_bytes() -> bytes:
        aead.encrypt_into(NONCE, padded, None, frame_view[16:])
        return bytes(frame)

    def decrypt_into_then_bytes() -> bytes:
        aead.decrypt_into(NONCE, memoryview(sealed), None, back)
        return bytes(view[:size])

    rows.append((
        "cryptography *_into + copy to bytes",
        best_us(into_then_bytes, number, repeat),
        best_us(decrypt_into_then_bytes, number, repeat),
    ))  # fmt: skip
    return rows


def _tunnel_pair(rng: random.Random) -> tuple[Tunnel, Tunnel]:
    a_key, b_key = StaticKeyPair.generate(rng), StaticKeyPair.generate(rng)
    psk = rng.randbytes(32)

    def make(me: StaticKeyPair, peer: StaticKeyPair, index: int) -> Tunnel:
        return Tunnel(static=me, peer_public=peer.public, preshared_key=psk, local_index=index,
                      rate_limiter=HandshakeRateLimiter(me.public, rng), rng=rng, now=0.0,
                      persistent_keepalive=None)  # fmt: skip

    a, b = make(a_key, b_key, 0x100), make(b_key, a_key, 0x200)
    src = ("192.0.2.1", 51820)
    init = a.initiate(0.0, 1e9)
    assert isinstance(init, WriteToNetwork)
    resp = b.decapsulate(init.datagram, src, 0.0, 1e9)
    assert isinstance(resp, WriteToNetwork)
    confirm = a.decapsulate(resp.datagram, src, 0.0, 1e9)
    assert isinstance(confirm, WriteToNetwork)
    b.decapsulate(confirm.datagram, src, 0.0, 1e9)
    assert a.has_session and b.has_session
    return a, b


def bench_tunnel(size: int, number: int, repeat: int) -> tuple[float, float]:
    """Full ``Tunnel.encapsulate`` / ``decapsulate`` per packet (loop overhead included)."""
    packet = bytes((0x45, 0)) + size.to_bytes(2, "big") + os.urandom(size - 4)
    src = ("192.0.2.1", 51820)
    best_enc = best_dec = float("inf")
    for r in range(repeat):
        a, b = _tunnel_pair(random.Random(r))
        encapsulate, decapsulate = a.encapsulate, b.decapsulate
        start = time.perf_counter()
        sent = [encapsulate(packet, 1.0, 1e9) for _ in range(number)]
        best_enc = min(best_enc, (time.perf_counter() - start) / number)
        datagrams = [s.datagram for s in sent if isinstance(s, WriteToNetwork)]
        start = time.perf_counter()
        received = [decapsulate(d, src, 1.0, 1e9) for d in datagrams]
        best_dec = min(best_dec, (time.perf_counter() - start) / number)
        assert all(isinstance(x, WriteToTunnel) for x in received), received[:3]
        assert received[-1].packet == packet  # type: ignore[union-attr]
    return best_enc * 1e6, best_dec * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--size", type=int, default=1420)
    args = parser.parse_args()
    print(f"{args.size}-byte packets, best of {args.repeat} x {args.packets}; us per packet")
    print(f"{'option':40} {'encrypt':>9} {'decrypt':>9}")
    for name, enc, dec in bench_primitives(args.size, args.packets, args.repeat):
        print(f"{name:40} {enc:9.3f} {dec:9.3f}")
    enc, dec = bench_tunnel(args.size, args.packets, args.repeat)
    print(f"{'Tunnel.encapsulate / decapsulate':40} {enc:9.3f} {dec:9.3f}")


if __name__ == "__main__":
    main()
