"""End to end: a hostile portal cannot stop or wedge the gateway (issue 14).

The development portal sends, as raw text frames, what no encoder of valid messages would:
a lone surrogate (the JSON escape ``\\ud800``) in a TURN username in ``init`` and in
``relays_presence``, ``NaN`` as ``expires_at`` of an ``authorize_flow``, a 4,400-digit
integer, and a frame nested 1,000 levels deep. The real gateway process drops each frame
with one logged error and lives on: it stays joined on the same socket, ``/readyz``
answers 200, and the development client keeps passing traffic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import CIDR_RESOURCE, Stack
from tests.e2e.hostile import echo_works, readyz, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "portal"


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as built:
        yield built


def _frame(event: str, payload: Any) -> str:
    """A frame as text; ``json.dumps`` writes a lone surrogate as its escape ``\\udXXX``."""
    return json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": None})


def _hostile_frames(e2e: Stack) -> list[str]:
    assert e2e.portal is not None
    relay = e2e.portal._relay_entries()[0]  # what the portal sends, with fresh credentials
    bad_relay = {**relay, "username": relay["username"] + "\ud800"}
    interface = {"ipv4": "100.64.0.9", "ipv6": "fd00:2021:1111::9"}
    config = {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True}
    flow = json.loads((FIXTURES / "authorize_flow.json").read_text())
    nan_flow = json.dumps(flow).replace('"expires_at": 1729813989', '"expires_at": NaN')
    assert "NaN" in nan_flow
    frames = [
        _frame("init", {"interface": interface, "config": config, "relays": [bad_relay]}),
        _frame("relays_presence", {"disconnected_ids": [], "connected": [bad_relay]}),
        nan_flow,
        '{"topic":"gateway","event":"init","ref":null,"payload":{"x":' + "9" * 4400 + "}}",
        '{"topic":"gateway","event":"init","ref":null,"payload":'
        + "[" * 1000 + "]" * 1000 + "}",
    ]
    assert "\\ud800" in frames[0] and "\\ud800" in frames[1]
    return frames


def test_hostile_frames_are_dropped_and_the_gateway_lives_on(e2e: Stack) -> None:
    assert e2e.portal is not None and e2e.gateway is not None
    client = e2e.start_client(CIDR_RESOURCE)
    client.wait_line(
        lambda s: s.startswith("READY") and f"resource={CIDR_RESOURCE}" in s, timeout=30
    )
    assert echo_works(e2e, b"before the hostile portal")
    attempts = e2e.portal.connection_attempts
    mark = len(e2e.gateway.lines)

    frames = _hostile_frames(e2e)
    for text in frames:
        assert e2e.portal.push_raw_to_gateway(text) == 1

    # Each frame: one logged error, nothing else lost.
    deadline = time.monotonic() + 20
    dropped: list[str] = []
    while time.monotonic() < deadline and len(dropped) < len(frames):
        dropped = [line for line in e2e.gateway.lines[mark:] if "Dropping portal frame" in line]
        time.sleep(0.1)
    assert len(dropped) == len(frames), e2e.logs()
    assert e2e.gateway.popen.poll() is None, e2e.logs()
    assert readyz(e2e) == "200", e2e.logs()
    status = e2e.wait_gateway_ready()
    assert status["portal"]["state"] == "joined"
    # Still the same socket: no frame made the gateway reconnect.
    assert e2e.portal.connection_attempts == attempts
    assert e2e.portal.gateways()[0].open_sockets == 1
    assert echo_works(e2e, b"after the hostile portal")
    # A valid frame still gets through: the channel is not wedged.
    relay = e2e.portal._relay_entries()[0]
    assert e2e.portal.push_raw_to_gateway(
        _frame("relays_presence", {"disconnected_ids": [], "connected": [relay]})
    ) == 1
    assert echo_works(e2e, b"after a valid relays_presence")
    assert e2e.gateway.popen.poll() is None and readyz(e2e) == "200", e2e.logs()
