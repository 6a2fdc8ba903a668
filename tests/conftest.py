"""Fixtures shared by the whole suite."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest

from tests.support.clock import ManualClock
from tests.support.coturn import CoturnServer
from tests.support.interop import require_bin

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "portal"


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """A live (non-daemon) actor thread would hang pytest at exit."""
    yield
    pykka.ActorRegistry.stop_all(timeout=5)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0xF12E)


@pytest.fixture
def portal_fixtures() -> Path:
    """``shared/fixtures/portal`` (the real portal messages); the tests must find it."""
    assert FIXTURES.is_dir(), f"portal fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[CoturnServer]:
    """A coturn relay on 127.0.0.1 with REST (shared-secret) credentials."""
    require_bin("turnserver", "coturn")
    server = CoturnServer(tmp_path / "coturn").start()
    try:
        yield server
    finally:
        server.stop()
