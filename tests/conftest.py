"""Fixtures shared by the whole suite."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest

from actors import logsetup
from devstack.coturn import CoturnServer
from tests.support.clock import ManualClock
from tests.support.interop import require_bin
from tests.support.secrets_scan import assert_no_secrets

#: Real portal messages (copied from Firezone's own tests and the portal's code), kept in the
#: repository so that a clone alone passes the suite.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "portal"


#: Our loggers are captured at DEBUG so the scan sees everything they could ever emit.
SCANNED_LOGGERS = ("gateway", "actors", "wire", "devportal", "devclient", "websocket")


@pytest.fixture(autouse=True)
def _no_secrets_in_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every log record of every test, formatted as production formats it, must be free of
    the secrets registered so far (tokens, private keys; see actors.logsetup).

    Tests marked ``configures_logging`` set logger levels themselves; for them the scan
    sees what their own configuration lets through."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logsetup.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    own_levels = request.node.get_closest_marker("configures_logging") is not None
    ours = [] if own_levels else [logging.getLogger(name) for name in SCANNED_LOGGERS]
    levels = [logger.level for logger in ours]
    for logger in ours:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for logger, level in zip(ours, levels, strict=True):
            logger.setLevel(level)
    assert_no_secrets(buffer.getvalue(), logsetup.registered_secrets())


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
    """``tests/fixtures/portal`` (the real 1.4-era portal messages); the tests must find it."""
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
