"""Test doubles for the portal connection: an in-memory websocket and a recording listener."""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pykka

from actors.io.websocket import SocketListener
from gateway.portal.login_url import LoginUrl


@dataclass
class FakeWebSocket:
    """One socket the actor opened; the test plays the server through ``listener``."""

    url: LoginUrl
    user_agent: str
    listener: SocketListener
    sent: list[str] = field(default_factory=list)
    closed: bool = False
    fail_sends: bool = False
    #: How it ended: ``abort`` (a reconnect: no close frame, rust/phoenix-channel/src/lib.rs) or
    #: ``close``.
    aborted: bool = False
    closed_gracefully: bool = False

    def send(self, text: str) -> None:
        if self.closed or self.fail_sends:
            raise ConnectionError("fake socket closed")
        self.sent.append(text)

    def abort(self) -> None:
        self.aborted = self.closed = True

    def close(self) -> None:
        self.closed_gracefully = self.closed = True

    @property
    def public_key(self) -> str:
        return parse_qs(urlsplit(self.url.url).query)["public_key"][0]

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.sent]

    def reply_ok(self, ref: int, topic: str = "gateway") -> None:
        self.listener.on_text(
            json.dumps(
                {
                    "topic": topic,
                    "event": "phx_reply",
                    "ref": ref,
                    "payload": {"status": "ok", "response": {}},
                }
            )
        )

    def push(self, event: str, payload: Any) -> None:
        self.listener.on_text(
            json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": None})
        )


class FakeWebSocketFactory:
    """A ``WebSocketFactory`` that records every socket it was asked to open."""

    def __init__(self) -> None:
        self.sockets: list[FakeWebSocket] = []
        self._cond = threading.Condition()

    def __call__(self, url: LoginUrl, user_agent: str, listener: SocketListener) -> FakeWebSocket:
        if not isinstance(url, LoginUrl):
            raise TypeError("expected a LoginUrl")
        sock = FakeWebSocket(url, user_agent, listener)
        with self._cond:
            self.sockets.append(sock)
            self._cond.notify_all()
        return sock

    def wait_for_sockets(self, count: int, timeout: float = 2.0) -> bool:
        """Wait (on a condition, not a sleep) until ``count`` sockets were opened."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.sockets) >= count, timeout)

    @property
    def last(self) -> FakeWebSocket:
        return self.sockets[-1]


class Recorder(pykka.ThreadingActor):
    """A listener actor that puts every message into a queue the test reads."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        self._inbox.put(message)


def next_of(inbox: queue.Queue[Any], kind: type, timeout: float = 2.0) -> Any:
    """The next message of type ``kind`` (others before it are discarded)."""
    while True:
        message = inbox.get(timeout=timeout)
        if isinstance(message, kind):
            return message
