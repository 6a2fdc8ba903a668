"""The DNS resolver: every lookup answers once, hung lookups do not hold the others back."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator

import pytest

from actors.resolver import IPAddress, Resolver

ANSWER = [ipaddress.ip_address("192.0.2.7")]


class Lookups:
    """``slow-*`` names hang until released; anything else answers at once."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def resolve(self, domain: str) -> list[IPAddress]:
        if domain.startswith("slow-"):
            self.release.wait(10)
            return []
        return list(ANSWER)


@pytest.fixture
def lookups() -> Iterator[Lookups]:
    fake = Lookups()
    yield fake
    fake.release.set()


def _answer(resolver: Resolver, domain: str, timeout: float) -> list[IPAddress] | None:
    done = threading.Event()
    result: list[list[IPAddress]] = []

    def callback(addresses: list[IPAddress]) -> None:
        result.append(addresses)
        done.set()

    resolver.resolve(domain, callback)
    return result[0] if done.wait(timeout) else None


def test_hung_lookups_do_not_hold_back_the_next_one(lookups: Lookups) -> None:
    """Dozens of lookups may hang on a blackholed domain; others still answer at once."""
    resolver = Resolver(lookups.resolve, timeout=5.0)
    try:
        for n in range(40):
            resolver.resolve(f"slow-{n}.example", lambda _addresses: None)
        assert _answer(resolver, "fast.example", timeout=2.0) == ANSWER
    finally:
        lookups.release.set()
        resolver.shutdown()


def test_a_lookup_past_its_timeout_answers_empty(lookups: Lookups) -> None:
    resolver = Resolver(lookups.resolve, timeout=0.2)
    try:
        assert _answer(resolver, "slow-1.example", timeout=2.0) == []
    finally:
        resolver.shutdown()


def test_beyond_the_in_flight_limit_the_excess_answers_empty_at_once(lookups: Lookups) -> None:
    resolver = Resolver(lookups.resolve, timeout=5.0, max_in_flight=2)
    try:
        for n in range(2):
            resolver.resolve(f"slow-{n}.example", lambda _addresses: None)
        assert _answer(resolver, "fast.example", timeout=1.0) == []
    finally:
        lookups.release.set()
        resolver.shutdown()


def test_a_lookup_hung_past_its_timeout_keeps_its_slot(lookups: Lookups) -> None:
    """The watchdog answers, but the worker is still stuck in getaddrinfo: admitting more
    would queue lookups behind the pool without bound."""
    resolver = Resolver(lookups.resolve, timeout=0.05, max_in_flight=2)
    try:
        assert _answer(resolver, "slow-1.example", timeout=2.0) == []  # by the watchdog
        assert _answer(resolver, "slow-2.example", timeout=2.0) == []
        assert resolver.in_flight == 2
        assert _answer(resolver, "fast.example", timeout=1.0) == []  # refused at once
        assert resolver.refused == 1
        lookups.release.set()  # the hung lookups return: their slots come back
        deadline = threading.Event()
        for _ in range(200):
            if resolver.in_flight == 0:
                break
            deadline.wait(0.01)
        assert _answer(resolver, "fast.example", timeout=2.0) == ANSWER
    finally:
        lookups.release.set()
        resolver.shutdown()
