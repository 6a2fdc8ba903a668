"""The devclient's websocket portal link against a websockets server on loopback."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from devclient.portal import PORTAL_ERROR, WebSocketPortal, login_url


class StubPortal:
    """Answers the join, pushes ``init``, records what the client sends."""

    def __init__(self) -> None:
        self.received: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.paths: list[str] = []
        self.user_agents: list[str | None] = []
        self.server: Server = serve(self._handler, "127.0.0.1", 0,
                                    process_request=self._process_request,
                                    ping_interval=None, close_timeout=1)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _process_request(self, conn: ServerConnection, request: Any) -> Any:
        self.paths.append(request.path)
        self.user_agents.append(request.headers.get("User-Agent"))
        if "token=bad" in request.path:
            return conn.respond(HTTPStatus.UNAUTHORIZED, "invalid token\n")
        return None

    def _handler(self, ws: ServerConnection) -> None:
        for raw in ws:
            frame = json.loads(raw)
            self.received.put(frame)
            if frame["event"] == "phx_join":
                ws.send(json.dumps({"topic": "client", "event": "phx_reply", "ref": frame["ref"],
                                    "payload": {"status": "ok", "response": {}}}))
                ws.send(json.dumps({"topic": "client", "event": "init", "ref": None,
                                    "payload": {"resources": []}}))

    def next_frame(self) -> dict[str, Any]:
        return self.received.get(timeout=5)


@pytest.fixture
def stub() -> Iterator[StubPortal]:
    portal = StubPortal()
    yield portal
    portal.server.shutdown()


def test_joins_delivers_pushes_and_sends_after_join(stub: StubPortal) -> None:
    delivered: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    url = login_url(f"ws://127.0.0.1:{stub.port}", token="good", external_id="e", name="n",
                    public_key="k")
    link = WebSocketPortal(url)
    link.send("create_flow", {"resource_id": "r1"})  # queued until the join is answered
    link.start(lambda event, payload: delivered.put((event, payload)))
    try:
        join = stub.next_frame()
        assert (join["topic"], join["event"]) == ("client", "phx_join")
        assert delivered.get(timeout=5) == ("init", {"resources": []})
        flow = stub.next_frame()
        assert (flow["event"], flow["payload"]) == ("create_flow", {"resource_id": "r1"})
        assert stub.paths[0].startswith("/client/websocket?token=good")
        assert stub.user_agents[0] and stub.user_agents[0].startswith("pyfz-devclient")
    finally:
        link.close()


def test_rejected_token_is_reported_once(stub: StubPortal) -> None:
    delivered: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    url = login_url(f"ws://127.0.0.1:{stub.port}", token="bad", external_id="e", name="n",
                    public_key="k")
    link = WebSocketPortal(url)
    link.start(lambda event, payload: delivered.put((event, payload)))
    try:
        assert delivered.get(timeout=5) == (PORTAL_ERROR, {"reason": "http_401"})
    finally:
        link.close()
    assert delivered.empty()
