"""PhoenixChannel core: lifecycle, frames, refs, heartbeat, backoff, fatal vs transient."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.errors import LocalProtocolError
from gateway.exit_codes import ExitCode
from gateway.portal.login_url import LoginUrlPrototype
from gateway.portal.messages import (
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    ConnectionReady,
    FlowAuthorized,
    Init,
    PortalIceCredentials,
)
from gateway.portal.phoenix import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    JOIN_TIMEOUT,
    CloseSocket,
    ConnectionFailure,
    Disconnected,
    Fatal,
    Ingress,
    Joined,
    OpenSocket,
    PhoenixChannel,
    SendFrame,
)

KEY_A = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
KEY_B = "OR2dYCLwMEtwqtjOxSm4SU7BbHJDfM8ZCqK7HKXXxDw="
CLIENT = uuid.UUID("3abd725a-733b-4801-ac16-72f26cd98a24")
INIT = {
    "topic": "gateway",
    "event": "init",
    "ref": None,
    "payload": {
        "interface": {"ipv4": "100.64.0.2", "ipv6": "fd00:2021:1111::2"},
        "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
    },
}


class Harness:
    """Drives one channel and collects what it asks for."""

    def __init__(self, seed: int = 1) -> None:
        self.now = 100.0
        proto = LoginUrlPrototype.build("wss://portal.test", "tok", "fz-id", "gw")
        self.channel = PhoenixChannel(proto, random.Random(seed), self.now)

    def actions(self) -> list[Any]:
        out = []
        while (a := self.channel.poll_action()) is not None:
            out.append(a)
        return out

    def events(self) -> list[Any]:
        out = []
        while (e := self.channel.poll_event()) is not None:
            out.append(e)
        return out

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(a.text) for a in self.actions() if isinstance(a, SendFrame)]

    def recv(self, frame: dict[str, Any]) -> None:
        self.channel.handle_text_frame(json.dumps(frame), self.now)

    def reply(
        self, ref: Any, status: str = "ok", response: Any = None, topic: str = "gateway"
    ) -> None:
        self.recv(
            {
                "topic": topic,
                "event": "phx_reply",
                "ref": ref,
                "payload": {"status": status, "response": response if response is not None else {}},
            }
        )

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.channel.handle_timeout(self.now)

    def run_until_deadline(self) -> None:
        deadline = self.channel.poll_timeout()
        assert deadline is not None
        self.now = max(self.now, deadline)
        self.channel.handle_timeout(self.now)

    def join(self, key: str = KEY_A) -> int:
        """connect + upgrade + join ok; returns the join ref."""
        self.channel.connect(key, self.now)
        (open_socket,) = self.actions()
        assert isinstance(open_socket, OpenSocket)
        self.channel.handle_connected(self.now)
        (join,) = self.frames()
        self.reply(join["ref"])
        assert any(isinstance(e, Joined) for e in self.events())
        return int(join["ref"])


def _public_key_param(action: OpenSocket) -> str:
    return parse_qs(urlsplit(action.url.url).query)["public_key"][0]


def test_starts_disconnected_and_does_nothing_without_connect() -> None:
    h = Harness()
    assert h.channel.state == "disconnected"
    assert h.channel.poll_timeout() is None and h.actions() == [] and h.events() == []
    h.advance(1000)
    assert h.actions() == []
    h.channel.send(FlowAuthorized("r"))
    assert h.channel.queued == 1 and h.actions() == []


def test_connect_opens_with_public_key_and_joins_first() -> None:
    h = Harness()
    h.channel.send(FlowAuthorized("queued-1"))
    h.channel.connect(KEY_A, h.now)
    (action,) = h.actions()
    assert isinstance(action, OpenSocket) and _public_key_param(action) == KEY_A
    assert h.channel.state == "connecting" and h.channel.poll_timeout() is None
    h.channel.handle_connected(h.now)
    frames = h.frames()
    assert frames == [{"topic": "gateway", "event": "phx_join", "payload": None, "ref": 0}]
    assert list(json.loads(json.dumps(frames[0])).keys()) == ["topic", "event", "payload", "ref"]
    assert h.channel.state == "joining"
    h.reply(0)
    assert h.events() == [Joined()] and h.channel.state == "joined"
    # queued message flushed after join, with the next ref
    assert h.frames() == [
        {"topic": "gateway", "event": "flow_authorized", "payload": {"ref": "queued-1"}, "ref": 1}
    ]


def test_frame_text_has_key_order_topic_event_payload_ref() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connected(h.now)
    (send,) = h.actions()
    assert send.text == '{"topic":"gateway","event":"phx_join","payload":null,"ref":0}'


def test_ref_counter_is_never_reset_across_reconnects() -> None:
    h = Harness()
    h.join()
    h.channel.send(FlowAuthorized("x"))
    assert h.frames()[0]["ref"] == 1
    h.channel.handle_disconnected("stream ended", h.now)
    h.events(), h.actions()
    h.run_until_deadline()
    assert isinstance(h.actions()[0], OpenSocket)
    h.channel.handle_connected(h.now)
    assert h.frames()[0] == {"topic": "gateway", "event": "phx_join", "payload": None, "ref": 2}


def test_send_when_joined_goes_out_immediately() -> None:
    h = Harness()
    h.join()
    h.channel.send(BroadcastIceCandidates((CLIENT,), ("c1",)))
    (frame,) = h.frames()
    assert frame["event"] == "broadcast_ice_candidates"
    assert frame["payload"] == {"client_ids": [str(CLIENT)], "candidates": ["c1"]}


def test_ingress_is_parsed_and_delivered() -> None:
    h = Harness()
    h.join()
    h.recv(INIT)
    (event,) = h.events()
    assert isinstance(event, Ingress) and isinstance(event.message, Init)


def test_heartbeat_every_thirty_seconds_with_reply() -> None:
    h = Harness()
    h.join()
    start = h.now
    assert h.channel.poll_timeout() == start + HEARTBEAT_INTERVAL
    h.advance(HEARTBEAT_INTERVAL - 0.01)
    assert h.frames() == []
    h.advance(0.01)
    (hb,) = h.frames()
    assert hb == {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": hb["ref"]}
    assert h.channel.poll_timeout() == h.now + HEARTBEAT_TIMEOUT
    h.reply(hb["ref"], topic="phoenix")
    assert h.channel.poll_timeout() == start + 2 * HEARTBEAT_INTERVAL
    h.advance(HEARTBEAT_INTERVAL)
    assert [f["event"] for f in h.frames()] == ["heartbeat"]
    assert h.channel.state == "joined" and h.events() == []


def test_missed_heartbeat_reply_is_transient() -> None:
    h = Harness()
    h.join()
    h.advance(HEARTBEAT_INTERVAL)
    (hb,) = h.frames()
    h.advance(HEARTBEAT_TIMEOUT - 0.01)
    assert h.channel.state == "joined"
    h.reply(hb["ref"] + 100, topic="phoenix")  # a reply for another ref does not count
    h.advance(0.01)
    assert h.channel.state == "backoff"
    assert h.events() == [Disconnected("portal did not respond to our heartbeat")]
    assert h.actions() == [CloseSocket()]


def test_missed_heartbeat_ticks_are_skipped_not_bunched() -> None:
    h = Harness()
    h.join()
    start = h.now
    h.channel.handle_timeout(start + 3 * HEARTBEAT_INTERVAL + 1)  # e.g. suspended process
    frames = h.frames()
    assert [f["event"] for f in frames] == ["heartbeat"]
    assert h.channel.poll_timeout() == start + 3 * HEARTBEAT_INTERVAL + 1 + HEARTBEAT_TIMEOUT


def test_no_busy_loop_deadline_moves_forward_after_handle_timeout() -> None:
    h = Harness()
    h.join()
    for _ in range(50):
        deadline = h.channel.poll_timeout()
        assert deadline is not None
        h.now = deadline
        h.channel.handle_timeout(h.now)
        nxt = h.channel.poll_timeout()
        assert nxt is not None and nxt > h.now
        for frame in h.frames():  # answer heartbeats, and re-join after reconnects
            if frame["event"] in ("heartbeat", "phx_join"):
                h.reply(frame["ref"])
        assert h.actions() == []


def test_no_busy_loop_in_backoff() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    for _ in range(30):
        h.channel.handle_connection_failed(ConnectionFailure(None, "refused"), h.now)
        deadline = h.channel.poll_timeout()
        assert deadline is not None and deadline > h.now
        h.channel.handle_timeout(deadline - 1e-6)
        assert not any(isinstance(a, OpenSocket) for a in h.actions())
        h.now = deadline
        h.channel.handle_timeout(h.now)
        assert isinstance(h.actions()[-1], OpenSocket)
        assert h.channel.poll_timeout() is None  # connecting: the shell reports the outcome


def test_backoff_delays_follow_the_schedule_and_reset_after_join() -> None:
    h = Harness(seed=99)
    h.channel.connect(KEY_A, h.now)
    h.actions()
    interval, delays = 0.5, []
    for _ in range(12):
        h.channel.handle_connection_failed(ConnectionFailure(503, "Service Unavailable"), h.now)
        delay = h.channel.poll_timeout() - h.now  # type: ignore[operator]
        assert interval * 0.5 <= delay <= interval * 1.5
        delays.append(delay)
        interval = min(interval * 1.5, 60.0)
        h.now += delay
        h.channel.handle_timeout(h.now)
        h.actions()
    assert h.channel.connection_attempts == 13
    # after a successful upgrade the next failure starts from 0.5 s again
    h.channel.handle_connected(h.now)
    h.channel.handle_disconnected("eof", h.now)
    assert h.channel.poll_timeout() - h.now <= 0.75  # type: ignore[operator]


def test_backoff_is_reset_by_explicit_connect_which_has_no_delay() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    for _ in range(10):
        h.channel.handle_connection_failed(ConnectionFailure(None, "timeout"), h.now)
        h.run_until_deadline()
        h.actions()
    h.channel.handle_connection_failed(ConnectionFailure(None, "timeout"), h.now)
    h.actions()
    assert h.channel.state == "backoff"
    h.channel.connect(KEY_A, h.now)  # e.g. NoTurnServers: same key, immediate
    assert isinstance(h.actions()[-1], OpenSocket)
    h.channel.handle_connection_failed(ConnectionFailure(None, "timeout"), h.now)
    assert h.channel.poll_timeout() - h.now <= 0.75  # type: ignore[operator]


@pytest.mark.parametrize("status", [500, 502, 503, 301, 101, None])
def test_non_4xx_upgrade_failures_are_transient(status: int | None) -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connection_failed(ConnectionFailure(status, "boom"), h.now)
    assert h.channel.state == "backoff"
    (event,) = h.events()
    assert isinstance(event, Disconnected) and "boom" in event.reason


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, ExitCode.AUTH_REJECTED),
        (403, ExitCode.AUTH_REJECTED),
        (400, ExitCode.FATAL),
        (404, ExitCode.FATAL),
        (422, ExitCode.FATAL),
        (429, ExitCode.FATAL),
        (499, ExitCode.FATAL),
    ],
)
def test_4xx_upgrade_failures_are_fatal(status: int, code: int) -> None:
    h = Harness()
    h.channel.send(FlowAuthorized("lost"))
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connection_failed(ConnectionFailure(status, "Invalid token"), h.now)
    assert h.channel.state == "failed" and h.channel.poll_timeout() is None
    (event,) = h.events()
    assert event == Fatal(f"portal refused the connection: HTTP {status} Invalid token", code)
    h.advance(3600)
    assert not any(isinstance(a, OpenSocket) for a in h.actions())  # no retry
    with pytest.raises(LocalProtocolError):
        h.channel.connect(KEY_A, h.now)
    h.channel.send(FlowAuthorized("after"))
    assert h.actions() == [] and h.channel.queued == 0


def _fixture(portal_fixtures: Path, name: str, **overrides: Any) -> dict[str, Any]:
    frame = json.loads((portal_fixtures / name).read_text())
    frame["topic"] = "gateway"  # the fixtures were written for topic "client"
    frame.update(overrides)
    return frame


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("phx_reply_error_disabled.json", "disabled"),
        ("phx_reply_error_invalid_version.json", "invalid_version"),
        ("phx_reply_error_not_found.json", "not_found"),
        ("phx_reply_error_unknown_reason.json", "bad reply"),
        ("phx_reply_error_unmatched_topic.json", "unmatched topic"),
    ],
)
def test_error_reply_to_join_is_fatal(portal_fixtures: Path, name: str, reason: str) -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connected(h.now)
    (join,) = h.frames()
    h.recv(_fixture(portal_fixtures, name, ref=join["ref"]))
    assert h.channel.state == "failed"
    (event,) = h.events()
    assert event == Fatal(
        f"portal refused to join channel 'gateway': {reason}", ExitCode.AUTH_REJECTED
    )


@pytest.mark.parametrize(
    "name",
    [
        "phx_reply_error_disabled.json",
        "phx_reply_error_invalid_version.json",
        "phx_reply_error_not_found.json",
        "phx_reply_error_unmatched_topic.json",
    ],
)
def test_error_replies_as_written_are_not_fatal(portal_fixtures: Path, name: str) -> None:
    """Their refs are null or the string "12": discarded or unmatched, the channel carries on."""
    h = Harness()
    h.join()
    h.recv(_fixture(portal_fixtures, name))
    assert h.channel.state == "joined" and h.events() == [] and h.actions() == []


def test_error_reply_to_other_request_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.join()
    h.channel.send(FlowAuthorized("bad-signature"))
    (frame,) = h.frames()
    h.reply(frame["ref"], status="error", response={"reason": "invalid_ref"})
    assert h.channel.state == "joined" and h.events() == []
    assert "invalid_ref" in caplog.text


def test_token_expired_is_fatal(portal_fixtures: Path) -> None:
    h = Harness()
    h.join()
    h.recv(_fixture(portal_fixtures, "disconnect_token_expired.json"))
    assert h.channel.state == "failed"
    assert h.events() == [Fatal("portal disconnected us: token expired", ExitCode.AUTH_REJECTED)]
    assert h.actions() == [CloseSocket()]


def test_phx_close_is_transient(portal_fixtures: Path) -> None:
    h = Harness()
    h.join()
    h.recv(_fixture(portal_fixtures, "phx_close.json"))
    assert h.channel.state == "backoff"
    (event,) = h.events()
    assert isinstance(event, Disconnected) and "phx_close" in event.reason
    assert h.actions() == [CloseSocket()]
    h.run_until_deadline()
    (action,) = h.actions()
    assert isinstance(action, OpenSocket) and _public_key_param(action) == KEY_A


def test_frame_with_join_ref_on_other_topic_is_tolerated(portal_fixtures: Path) -> None:
    h = Harness()
    h.join()
    frame = json.loads((portal_fixtures / "phoenix_inbound_message_with_join_ref.json").read_text())
    h.recv(frame)
    h.recv({**INIT, "join_ref": None, "extra": [1]})  # extra keys on our topic are fine too
    (event,) = h.events()
    assert isinstance(event, Ingress) and isinstance(event.message, Init)
    assert h.channel.state == "joined" and h.channel.malformed_frames == 0


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"topic": "gateway"}',
        '{"topic": "gateway", "event": "no_such_event", "payload": {}, "ref": null}',
        '{"topic": "gateway", "event": "init", "payload": {"interface": {}}, "ref": null}',
        '{"topic": "gateway", "event": "phx_reply", "payload": {"status": "meh"}, "ref": 0}',
    ],
)
def test_malformed_frames_are_dropped_and_the_channel_continues(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness()
    h.join()
    h.channel.handle_text_frame(text, h.now)
    assert h.channel.state == "joined" and h.events() == [] and h.actions() == []
    assert h.channel.malformed_frames == 1
    assert "Dropping portal frame" in caplog.text
    h.recv(INIT)
    assert len(h.events()) == 1


def test_reply_with_string_or_null_ref_is_discarded() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connected(h.now)
    (join,) = h.frames()
    h.reply(str(join["ref"]))
    h.reply(None)
    assert h.channel.state == "joining"
    h.reply(join["ref"])
    assert h.channel.state == "joined"


def test_unanswered_join_times_out_as_transient() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    h.channel.handle_connected(h.now)
    h.frames()
    assert h.channel.poll_timeout() == h.now + JOIN_TIMEOUT
    h.advance(JOIN_TIMEOUT)
    assert h.channel.state == "backoff"
    assert h.events() == [Disconnected("portal did not answer our join")]


def test_phx_error_rejoins_on_the_same_socket() -> None:
    h = Harness()
    h.join()
    h.recv({"topic": "gateway", "event": "phx_error", "payload": {}, "ref": None})
    (frame,) = h.frames()
    assert frame["event"] == "phx_join" and h.channel.state == "joining"
    assert isinstance(h.events()[0], Disconnected)
    h.channel.send(FlowAuthorized("while-rejoining"))
    assert h.frames() == []
    h.reply(frame["ref"])
    assert h.events() == [Joined()]
    assert [f["payload"] for f in h.frames()] == [{"ref": "while-rejoining"}]


def test_connect_with_same_key_while_connecting_is_a_noop() -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    assert len(h.actions()) == 1
    h.channel.connect(KEY_A, h.now)
    assert h.actions() == [] and h.events() == [] and h.channel.connection_attempts == 1


def test_connect_with_same_key_when_joined_forces_a_reconnect() -> None:
    h = Harness()
    h.join()
    h.channel.connect(KEY_A, h.now)
    actions = h.actions()
    assert actions[0] == CloseSocket() and isinstance(actions[1], OpenSocket)
    assert _public_key_param(actions[1]) == KEY_A


@pytest.mark.parametrize("phase", ["connecting", "joining", "joined", "backoff"])
def test_connect_with_new_key_tears_down_and_reconnects_immediately(phase: str) -> None:
    h = Harness()
    h.channel.connect(KEY_A, h.now)
    h.actions()
    if phase in ("joining", "joined"):
        h.channel.handle_connected(h.now)
        join = h.frames()[0]
        if phase == "joined":
            h.reply(join["ref"])
    elif phase == "backoff":
        h.channel.handle_connection_failed(ConnectionFailure(None, "refused"), h.now)
        h.actions()
    h.events()
    assert h.channel.state == phase
    h.channel.connect(KEY_B, h.now)
    actions = h.actions()
    assert isinstance(actions[-1], OpenSocket) and _public_key_param(actions[-1]) == KEY_B
    if phase != "backoff":
        assert actions[0] == CloseSocket()
        assert h.events() == [Disconnected("reconnecting with a new public key")]
    assert h.channel.state == "connecting" and h.channel.url.public_key == KEY_B  # type: ignore[union-attr]


def test_key_change_drops_queued_candidates_but_keeps_answers() -> None:
    h = Harness()
    h.join()
    h.channel.handle_disconnected("eof", h.now)
    h.actions(), h.events()
    creds = PortalIceCredentials("u", "p")
    h.channel.send(BroadcastIceCandidates((CLIENT,), ("c1",)))
    h.channel.send(FlowAuthorized("keep-1"))
    h.channel.send(BroadcastInvalidatedIceCandidates((CLIENT,), ("c2",)))
    h.channel.send(ConnectionReady("keep-2", creds))
    h.channel.connect(KEY_B, h.now)
    assert h.channel.queued == 2 and h.channel.dropped_messages == 2
    h.actions()
    h.channel.handle_connected(h.now)
    (join,) = h.frames()
    h.reply(join["ref"])
    assert [f["event"] for f in h.frames()] == ["flow_authorized", "connection_ready"]


def test_same_key_reconnect_keeps_queued_candidates() -> None:
    h = Harness()
    h.join()
    h.channel.handle_disconnected("eof", h.now)
    h.channel.send(BroadcastIceCandidates((CLIENT,), ("c1",)))
    h.run_until_deadline()
    h.channel.handle_connected(h.now)
    join = next(f for f in h.frames() if f["event"] == "phx_join")
    h.reply(join["ref"])
    assert [f["event"] for f in h.frames()] == ["broadcast_ice_candidates"]


def test_queue_is_bounded_and_drops_the_oldest() -> None:
    proto = LoginUrlPrototype.build("wss://portal.test", "tok", "fz-id", "gw")
    channel = PhoenixChannel(proto, random.Random(1), 0.0, max_queued=3)
    for i in range(5):
        channel.send(FlowAuthorized(f"r{i}"))
    assert channel.queued == 3 and channel.dropped_messages == 2
    channel.connect(KEY_A, 0.0)
    channel.handle_connected(0.0)
    channel.handle_text_frame(
        '{"topic":"gateway","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":0}',
        0.0,
    )
    sent = []
    while (a := channel.poll_action()) is not None:
        if isinstance(a, SendFrame):
            sent.append(json.loads(a.text))
    assert [f["payload"]["ref"] for f in sent[1:]] == ["r2", "r3", "r4"]


def test_disconnect_with_other_reason_and_stale_inputs_are_harmless() -> None:
    h = Harness()
    h.channel.handle_disconnected("nothing open", h.now)  # no socket: ignored
    h.channel.handle_text_frame(json.dumps(INIT), h.now)  # not connected: ignored
    assert h.events() == [] and h.channel.state == "disconnected"
    with pytest.raises(LocalProtocolError):
        h.channel.handle_connected(h.now)
    h.join()
    h.recv({"topic": "gateway", "event": "disconnect", "payload": {"reason": "other"}, "ref": None})
    assert h.channel.state == "backoff"


def test_logs_never_contain_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    h = Harness()
    h.join()
    h.channel.handle_disconnected("eof", h.now)
    h.run_until_deadline()
    h.channel.handle_connection_failed(ConnectionFailure(401, "Invalid token"), h.now)
    assert "tok&" not in caplog.text and "token=tok" not in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  \n",
        '{"topic":"gateway","event":"init","payload":{"interface":',
        '{"topic":"gateway","event":"ini',  # cut inside a string
        '{"topic":"gateway","event":"init","payload":{},"ref":nu',  # cut inside a literal
        "[1, 2",
    ],
)
def test_truncated_frames_are_a_transient_connection_error(text: str) -> None:
    """JSON that ends early is an IO-level error (reconnect with backoff), not a bad
    frame to drop: the rest of the stream can no longer be trusted."""
    h = Harness()
    h.join()
    h.channel.handle_text_frame(text, h.now)
    assert h.channel.state == "backoff" and h.channel.malformed_frames == 0
    (event,) = h.events()
    assert isinstance(event, Disconnected) and "truncated" in event.reason
    assert h.actions() == [CloseSocket()]
    h.run_until_deadline()
    (action,) = h.actions()
    assert isinstance(action, OpenSocket) and _public_key_param(action) == KEY_A


@pytest.mark.parametrize(
    "text",
    [
        '{"topic" "gateway"}',
        '{"topic": "gateway",, "event": "init"}',
        '{"topic": "gateway", "event": "init", "payload": {}, "ref": null} t',  # extra data
        '{"topic": "gateway", "event": "init", "payload": {}, "ref": nope}',
        "\x00",
    ],
)
def test_complete_but_invalid_json_is_still_dropped(text: str) -> None:
    h = Harness()
    h.join()
    h.channel.handle_text_frame(text, h.now)
    assert h.channel.state == "joined" and h.events() == [] and h.actions() == []
    assert h.channel.malformed_frames == 1


def test_reconnects_count_rejoins_not_attempts() -> None:
    """3 real reconnects with failed upgrades and an unanswered join in between: 3."""
    h = Harness()
    h.join()
    assert (h.channel.reconnects, h.channel.connection_attempts) == (0, 1)
    for _ in range(3):
        h.channel.handle_disconnected("server went away", h.now)
        for _ in range(2):  # two attempts the portal refuses
            h.run_until_deadline()
            assert any(isinstance(a, OpenSocket) for a in h.actions())
            h.channel.handle_connection_failed(ConnectionFailure(502, "bad gateway"), h.now)
        h.run_until_deadline()  # one that connects but is never joined
        h.actions()
        h.channel.handle_connected(h.now)
        h.advance(JOIN_TIMEOUT)
        assert h.channel.state == "backoff"
        h.run_until_deadline()  # and one that joins
        h.actions()
        h.channel.handle_connected(h.now)
        (join,) = [f for f in h.frames() if f["event"] == "phx_join"]
        h.reply(join["ref"])
        assert h.channel.state == "joined"
    assert h.channel.reconnects == 3
    assert h.channel.connection_attempts == 1 + 3 * 4
    assert h.channel.joins == 4
