"""PortalActor wiring with an in-memory websocket and a recording listener."""

from __future__ import annotations

import queue
import random
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.messages import (
    Connect,
    GetPortalStatus,
    KeyRotated,
    PortalDisconnected,
    PortalFatal,
    PortalIngress,
    PortalJoined,
    PortalStatus,
    SendToPortal,
)
from actors.portal import PortalActor
from actors.timer import Timer, Wake
from gateway.exit_codes import ExitCode
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import FlowAuthorized, Init
from tests.support.clock import ManualClock
from tests.support.portal import FakeWebSocket, FakeWebSocketFactory, Recorder, next_of

KEY_A = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
KEY_B = "OR2dYCLwMEtwqtjOxSm4SU7BbHJDfM8ZCqK7HKXXxDw="
INIT = {
    "interface": {"ipv4": "100.64.0.2", "ipv6": "fd00:2021:1111::2"},
    "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
}


class Rig:
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.timer = Timer(clock)
        self.timer.start()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.factory = FakeWebSocketFactory()
        self.prototype = LoginUrlPrototype.build("wss://portal.test", "s3cret", "fz", "gw")
        self.portal = PortalActor.start(
            prototype=self.prototype,
            listener=Recorder.start(self.inbox),
            clock=clock,
            rng=random.Random(4),
            timer=self.timer,
            user_agent="Debian/12 connlib/1.4.0 (x86_64; 6.1.0)",
            websocket_factory=self.factory,
        )

    def status(self) -> PortalStatus:
        """Ask: also a barrier, every earlier tell has been handled."""
        result = self.portal.ask(GetPortalStatus(), timeout=2)
        assert isinstance(result, PortalStatus)
        return result

    def join(self, key: str = KEY_A) -> None:
        self.portal.tell(Connect(key))
        self.status()
        sock = self.factory.last
        sock.listener.on_open()
        self.status()
        (join,) = sock.frames()
        assert join["event"] == "phx_join"
        sock.reply_ok(join["ref"])
        next_of(self.inbox, PortalJoined)

    def wake_after(self, seconds: float) -> None:
        self.clock.tick(seconds)
        self.portal.tell(Wake())
        self.status()


@pytest.fixture
def rig(clock: ManualClock) -> Iterator[Rig]:
    r = Rig(clock)
    yield r
    pykka.ActorRegistry.stop_all(timeout=5)
    r.timer.stop()


def test_nothing_happens_before_connect(rig: Rig) -> None:
    assert rig.status().state == "disconnected"
    rig.wake_after(3600)
    assert rig.factory.sockets == []


def test_join_and_ingress(rig: Rig) -> None:
    rig.join()
    sock = rig.factory.last
    assert sock.public_key == KEY_A and sock.user_agent.startswith("Debian/12 connlib/1.4.0")
    status = rig.status()
    assert status.state == "joined" and status.joined_since == rig.clock.monotonic()
    assert "s3cret" not in status.url and "token=<redacted>" in status.url
    sock.push("init", INIT)
    ingress = next_of(rig.inbox, PortalIngress)
    assert isinstance(ingress.message, Init)


def test_send_to_portal_and_reply(rig: Rig) -> None:
    rig.portal.tell(SendToPortal(FlowAuthorized("queued")))
    rig.join()
    sock = rig.factory.last
    assert [f["event"] for f in sock.frames()] == ["phx_join", "flow_authorized"]
    rig.portal.tell(SendToPortal(FlowAuthorized("live")))
    rig.status()
    frame = sock.frames()[-1]
    assert frame["payload"] == {"ref": "live"}
    sock.reply_ok(frame["ref"])
    assert rig.status().state == "joined"


def test_heartbeat_through_wake(rig: Rig) -> None:
    rig.join()
    sock = rig.factory.last
    rig.wake_after(29)
    assert sock.frames()[-1]["event"] == "phx_join"
    rig.wake_after(1)
    heartbeat = sock.frames()[-1]
    assert (heartbeat["topic"], heartbeat["event"]) == ("phoenix", "heartbeat")
    sock.reply_ok(heartbeat["ref"], topic="phoenix")
    rig.wake_after(5)
    assert rig.status().state == "joined"  # answered in time: still joined


def test_missed_heartbeat_reconnects(rig: Rig) -> None:
    rig.join()
    rig.wake_after(30)
    rig.wake_after(5)
    assert (
        next_of(rig.inbox, PortalDisconnected).reason == "portal did not respond to our heartbeat"
    )
    assert rig.factory.sockets[0].closed


def test_reconnect_after_server_drop(rig: Rig) -> None:
    rig.join()
    first = rig.factory.last
    first.listener.on_closed("server closed the websocket")
    assert "server closed" in next_of(rig.inbox, PortalDisconnected).reason
    assert rig.status().state == "backoff"
    rig.wake_after(0.1)  # before the earliest possible backoff deadline (0.25 s)
    assert len(rig.factory.sockets) == 1
    rig.wake_after(1)
    assert len(rig.factory.sockets) == 2 and first.closed
    second = rig.factory.last
    assert second.public_key == KEY_A
    second.listener.on_open()
    rig.status()
    assert second.frames()[0]["event"] == "phx_join"
    first.listener.on_text('{"topic":"gateway","event":"phx_close","payload":{},"ref":null}')
    second.reply_ok(second.frames()[0]["ref"])
    next_of(rig.inbox, PortalJoined)
    status = rig.status()
    assert status.state == "joined" and status.reconnects == 1  # old socket's news ignored


def test_status_counts_reconnects_not_attempts(rig: Rig) -> None:
    """Two real reconnects, each after two refused attempts: 2 reconnects, 7 attempts."""
    rig.join()
    for _ in range(2):
        rig.factory.last.listener.on_closed("server closed the websocket")
        rig.status()  # handled before the clock moves
        for _ in range(2):
            rig.wake_after(30)
            rig.factory.last.listener.on_failed(502, "Bad Gateway")
            rig.status()
        rig.wake_after(30)
        sock = rig.factory.last
        sock.listener.on_open()
        rig.status()
        (join,) = sock.frames()
        sock.reply_ok(join["ref"])
        assert rig.status().state == "joined"
    status = rig.status()
    assert (status.reconnects, status.connection_attempts) == (2, 7)


def test_fatal_401_stops_without_retry(rig: Rig) -> None:
    rig.portal.tell(Connect(KEY_A))
    rig.status()
    rig.factory.last.listener.on_failed(401, "Invalid token")
    fatal = next_of(rig.inbox, PortalFatal)
    assert fatal.exit_code == ExitCode.AUTH_REJECTED
    assert fatal.reason == "portal refused the connection: HTTP 401 Invalid token"
    rig.wake_after(3600)
    rig.portal.tell(Connect(KEY_A))  # ignored once failed, actor stays alive
    assert rig.status().state == "failed"
    assert len(rig.factory.sockets) == 1


def test_transient_failure_retries(rig: Rig) -> None:
    rig.portal.tell(Connect(KEY_A))
    rig.status()
    rig.factory.last.listener.on_failed(None, "ConnectionRefusedError: [Errno 111]")
    next_of(rig.inbox, PortalDisconnected)
    rig.wake_after(1)
    assert len(rig.factory.sockets) == 2


def test_key_rotation_reconnects_with_new_key(rig: Rig) -> None:
    rig.join()
    old = rig.factory.last
    rig.portal.tell(KeyRotated(KEY_B))
    assert next_of(rig.inbox, PortalDisconnected).reason == "reconnecting with a new public key"
    new = rig.factory.last
    assert old.closed and new is not old and new.public_key == KEY_B
    old.push("init", INIT)  # late frame from the old socket: ignored
    new.listener.on_open()
    rig.status()
    new.reply_ok(new.frames()[0]["ref"])
    next_of(rig.inbox, PortalJoined)
    new.push("init", INIT)
    next_of(rig.inbox, PortalIngress)
    assert rig.inbox.empty()


def _dropped(sock: FakeWebSocket) -> bool:
    return sock.aborted and not sock.closed_gracefully


def test_reconnects_drop_the_socket_without_a_close_frame(rig: Rig) -> None:
    """As rust/phoenix-channel/src/lib.rs: a reconnect (new key, same key, missed heartbeat) just
    drops the socket; only the actor's stop closes it with a close frame (README: graceful stop)."""
    rig.join()
    rig.portal.tell(KeyRotated(KEY_B))
    rig.status()
    assert _dropped(rig.factory.sockets[0])
    second = rig.factory.last
    second.listener.on_open()
    rig.status()
    second.reply_ok(second.frames()[0]["ref"])
    rig.portal.tell(Connect(KEY_B))  # same key while joined: a forced reconnect
    rig.status()
    assert _dropped(second)
    third = rig.factory.last
    third.listener.on_open()
    rig.status()
    third.reply_ok(third.frames()[0]["ref"])
    rig.wake_after(30)
    rig.wake_after(5)  # heartbeat unanswered
    assert _dropped(third)
    rig.wake_after(60)
    fourth = rig.factory.last
    assert fourth is not third and not fourth.closed
    rig.portal.stop(timeout=5)
    assert fourth.closed_gracefully and not fourth.aborted


def test_send_failure_is_a_transient_disconnect(rig: Rig) -> None:
    rig.join()
    rig.factory.last.fail_sends = True
    rig.portal.tell(SendToPortal(FlowAuthorized("x")))
    assert "send failed" in next_of(rig.inbox, PortalDisconnected).reason
    assert rig.status().state == "backoff"


def test_the_actor_rejects_a_prototype_as_public_key(rig: Rig) -> None:
    rig.portal.tell(Connect(rig.prototype))  # type: ignore[arg-type]
    with pytest.raises(pykka.ActorDeadError):
        for _ in range(100):
            rig.status()
    assert rig.factory.sockets == []


def test_timer_wakes_the_actor_for_real(rig: Rig) -> None:
    """The Timer thread itself tells Wake once the backoff deadline is due on the clock."""
    rig.portal.tell(Connect(KEY_A))
    rig.status()
    rig.factory.last.listener.on_failed(503, "Service Unavailable")
    next_of(rig.inbox, PortalDisconnected)
    rig.clock.tick(2)
    rig.portal.tell(SendToPortal(FlowAuthorized("poke")))  # re-arms with a due deadline
    assert rig.factory.wait_for_sockets(2, timeout=3)  # no Wake told by the test


def test_wire_log_redaction() -> None:
    from actors.io.websocket import redact, redact_frame

    frame = (
        '{"topic":"gateway","event":"authorize_flow","payload":{"client":{"preshared_key":'
        '"BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=","public_key":"pk"},'
        '"client_ice_credentials":{"username":"u","password":"se\\"cret"}},"ref":null}'
    )
    cleaned = redact_frame(frame)
    assert "BzPiNE9q" not in cleaned and 'se\\"cret' not in cleaned
    assert '"public_key":"pk"' in cleaned and '"username":"u"' in cleaned
    assert redact("GET /gateway/websocket?token=abc.def&name=x") == (
        "GET /gateway/websocket?token=<redacted>&name=x"
    )


def test_websocket_library_logger_cannot_leak_the_token(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import actors.io.websocket  # noqa: F401  (installs the filter)

    caplog.set_level("DEBUG", logger="websocket")
    logging.getLogger("websocket").debug("connect %s", "wss://h/gateway/websocket?token=SECRET&x=1")
    assert "SECRET" not in caplog.text and "token=<redacted>" in caplog.text


def test_status_counts_refused_frames_and_the_channel_stays_joined(rig: Rig) -> None:
    rig.join()
    sock = rig.factory.last
    sock.listener.on_text('{"topic":"gateway","event":"init","payload":' + "[" * 40 + "]" * 40
                          + ',"ref":null}')
    sock.listener.on_text('{"topic":"gateway","event":"init","payload":NaN,"ref":null}')
    status = rig.status()
    assert status.malformed_frames == 2 and status.state == "joined"
    sock.push("init", INIT)
    assert isinstance(next_of(rig.inbox, PortalIngress).message, Init)
