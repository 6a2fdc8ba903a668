"""mac1, mac2, cookie replies and the node-wide handshake rate limiter."""

from __future__ import annotations

import random

from gateway.wg.constants import COOKIE_EXPIRATION, COOKIE_REPLY_LEN
from gateway.wg.cookie import CookieChecker, CookieJar
from gateway.wg.keys import StaticKeyPair
from gateway.wg.ratelimit import HandshakeRateLimiter

SRC = ("198.51.100.7", 40000)


def _setup() -> tuple[CookieChecker, CookieJar, random.Random]:
    rng = random.Random(5)
    responder = StaticKeyPair.generate(rng)
    return CookieChecker(responder.public), CookieJar(responder.public), rng


def test_mac1_verifies_and_detects_tampering() -> None:
    checker, jar, _ = _setup()
    message = jar.seal(b"\x01\0\0\0" + bytes(112), now=0.0)
    assert len(message) == 148
    assert checker.verify_mac1(message)
    assert message[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    for pos in (0, 50, 116, 131):
        bad = bytearray(message)
        bad[pos] ^= 1
        assert not checker.verify_mac1(bytes(bad))


def test_cookie_reply_round_trip_then_mac2() -> None:
    checker, jar, rng = _setup()
    secret = rng.randbytes(32)
    first = jar.seal(b"\x01\0\0\0" + b"\xaa" * 112, now=10.0)
    assert not checker.verify_mac2(first, SRC, secret)
    reply = checker.cookie_reply(first, SRC, secret, rng)
    assert len(reply) == COOKIE_REPLY_LEN and reply[:4] == b"\x03\0\0\0"
    assert reply[4:8] == first[4:8]  # addressed to the sender index of the message
    assert jar.consume_reply(reply, now=10.0)
    second = jar.seal(b"\x01\0\0\0" + b"\xbb" * 112, now=15.0)
    assert checker.verify_mac1(second)
    assert checker.verify_mac2(second, SRC, secret)
    assert not checker.verify_mac2(second, ("198.51.100.7", 40001), secret)  # bound to src
    assert not checker.verify_mac2(second, SRC, rng.randbytes(32))  # bound to the secret
    # The cookie ages out: mac2 goes back to zeros.
    third = jar.seal(b"\x01\0\0\0" + b"\xcc" * 112, now=10.0 + COOKIE_EXPIRATION)
    assert third[-16:] == bytes(16)


def test_cookie_reply_for_another_message_or_tampered_is_refused() -> None:
    checker, jar, rng = _setup()
    secret = rng.randbytes(32)
    stale = jar.seal(b"\x01\0\0\0" + b"\x01" * 112, now=0.0)
    jar.seal(b"\x01\0\0\0" + b"\x02" * 112, now=0.0)  # a newer message: different mac1
    assert not jar.consume_reply(checker.cookie_reply(stale, SRC, secret, rng), now=0.0)
    current = jar.seal(b"\x01\0\0\0" + b"\x03" * 112, now=0.0)
    reply = bytearray(checker.cookie_reply(current, SRC, secret, rng))
    reply[40] ^= 1
    assert not jar.consume_reply(bytes(reply), now=0.0)
    assert not jar.consume_reply(bytes(reply[:63]), now=0.0)
    assert not jar.has_cookie
    assert not CookieJar(bytes(32)).consume_reply(bytes(reply), now=0.0)  # nothing sent yet


def test_ipv6_source_addresses_work() -> None:
    checker, jar, rng = _setup()
    secret = rng.randbytes(32)
    src6 = ("2001:db8::1", 51820)
    first = jar.seal(b"\x01\0\0\0" + bytes(112), now=0.0)
    assert jar.consume_reply(checker.cookie_reply(first, src6, secret, rng), now=0.0)
    second = jar.seal(b"\x01\0\0\0" + bytes(112), now=0.0)
    assert checker.verify_mac2(second, src6, secret)


def test_rate_limiter_counts_per_window() -> None:
    limiter = HandshakeRateLimiter(bytes(32), random.Random(1), limit_per_second=3)
    assert limiter.poll_timeout() is None
    assert [limiter.note_handshake(10.0) for _ in range(4)] == [False, False, False, True]
    assert limiter.is_under_load(10.5)
    assert limiter.poll_timeout() == 11.0
    limiter.handle_timeout(10.9)
    assert limiter.is_under_load(10.9)  # the window is not over yet
    limiter.handle_timeout(11.0)
    assert limiter.poll_timeout() is None  # idle: no wake-ups
    assert not limiter.is_under_load(11.0)
    # Lazily reset on use even without handle_timeout.
    assert [limiter.note_handshake(20.0) for _ in range(4)][-1]
    assert not limiter.note_handshake(21.0)


def test_default_limit_is_100_per_second() -> None:
    limiter = HandshakeRateLimiter(bytes(32), random.Random(1))
    results = [limiter.note_handshake(0.5) for _ in range(101)]
    assert results.count(True) == 1 and results[-1]


def test_rate_limiter_counts_exactly_under_concurrent_use() -> None:
    """Every PeerSession shares the node's limiter from its own IO thread, each with the
    ``now`` it read a moment earlier or later: with many threads counting in one window,
    exactly ``limit`` handshakes pass, none more. (A thread whose clock reading is older
    than the window's start must count in it, not start the window over.)"""
    import sys
    import threading

    threads, per_thread, limit = 8, 5_000, 10_000
    limiter = HandshakeRateLimiter(bytes(32), random.Random(1), limit_per_second=limit)
    passed = [0] * threads
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        now = 10.0 + index * 0.01  # read at different instants, all in one window
        start.wait()
        count = 0
        for _ in range(per_thread):
            if not limiter.note_handshake(now):
                count += 1
        passed[index] = count

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
    assert not limiter.note_handshake(10.5)  # the thread that read the clock last came first
    passed.append(1)
    try:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(passed) == limit
    assert limiter.is_under_load(10.5)
