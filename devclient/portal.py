"""The client's portal connection: websocket-client, minimal Phoenix V1 framing, heartbeats.

One reader thread owns the socket's receive side: it joins topic ``client``, sends a
heartbeat every 30 s and hands every pushed ``client`` event to ``deliver`` (the client's
loop queues it and wakes up). A lost connection is retried with capped backoff; an HTTP 4xx
at the upgrade is final and reported as the pseudo event ``portal_error``. ``send`` may be
called from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import websocket

log = logging.getLogger(__name__)

TOPIC = "client"
HEARTBEAT_INTERVAL = 30.0
USER_AGENT = "pyfz-devclient/0.1"
#: Pseudo event delivered when the portal refuses us for good (payload: {"reason": ...}).
PORTAL_ERROR = "portal_error"

Deliver = Callable[[str, Any], None]


def login_url(portal: str, *, token: str, external_id: str, name: str, public_key: str) -> str:
    """``<portal>/client/websocket?token=..&external_id=..&name=..&public_key=..``."""
    base = portal.rstrip("/")
    if not base.endswith("/websocket"):
        base += "/client/websocket"
    query = urllib.parse.urlencode({"token": token, "external_id": external_id, "name": name,
                                    "public_key": public_key})
    return f"{base}?{query}"


def redact(url: str) -> str:
    """The URL without the token, for logs."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, "<redacted>" if k == "token" else v)
             for k, v in urllib.parse.parse_qsl(parts.query)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def encode_frame(topic: str, event: str, payload: Any, ref: int | None) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload,
                       "ref": None if ref is None else str(ref)})


def decode_frame(text: str) -> tuple[str, str, Any, Any] | None:
    """(topic, event, payload, ref) of a V1 JSON object frame; None when malformed."""
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    if not isinstance(frame, dict):
        return None
    topic, event = frame.get("topic"), frame.get("event")
    if not isinstance(topic, str) or not isinstance(event, str):
        return None
    return topic, event, frame.get("payload"), frame.get("ref")


class WebSocketPortal:
    """The portal link the client loop uses (``start``/``send``/``close``)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._refs = itertools.count(1)
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        self._joined = False
        self._backlog: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, deliver: Deliver) -> None:
        self._thread = threading.Thread(target=self._run, args=(deliver,), name="PortalReader",
                                        daemon=True)
        self._thread.start()

    def send(self, event: str, payload: dict[str, Any]) -> None:
        """Push to topic ``client``; held back until the join was answered."""
        with self._lock:
            text = encode_frame(TOPIC, event, payload, next(self._refs))
            if self._ws is None or not self._joined:
                self._backlog.append(text)
                return
            self._send_locked(text)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            ws = self._ws
        if ws is not None:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                ws.close(status=websocket.STATUS_NORMAL, timeout=1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=3)

    # ------------------------------------------------------------------ reader thread

    def _send_locked(self, text: str) -> None:
        assert self._ws is not None
        try:
            self._ws.send(text)
        except (OSError, websocket.WebSocketException) as exc:
            log.warning("portal send failed: %s", exc)

    def _run(self, deliver: Deliver) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                ws = websocket.create_connection(self._url, timeout=self._connect_timeout,
                                                 header={"User-Agent": USER_AGENT})
            except websocket.WebSocketBadStatusException as exc:
                if 400 <= exc.status_code < 500:
                    log.error("portal refused the connection: HTTP %s", exc.status_code)
                    deliver(PORTAL_ERROR, {"reason": f"http_{exc.status_code}"})
                    return
                log.warning("portal upgrade failed: HTTP %s", exc.status_code)
            except (OSError, websocket.WebSocketException) as exc:
                log.warning("cannot reach the portal at %s: %s", redact(self._url), exc)
            else:
                backoff = 0.5
                self._session(ws, deliver)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)

    def _session(self, ws: websocket.WebSocket, deliver: Deliver) -> None:
        log.info("connected to the portal at %s", redact(self._url))
        ws.settimeout(0.5)
        join_ref = next(self._refs)
        with self._lock:
            self._ws, self._joined = ws, False
            self._send_locked(encode_frame(TOPIC, "phx_join", {}, join_ref))
        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat += HEARTBEAT_INTERVAL
                    with self._lock:
                        self._send_locked(
                            encode_frame("phoenix", "heartbeat", {}, next(self._refs)))
                try:
                    opcode, data = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException) as exc:
                    if not self._stop.is_set():  # close() from our owner ends it quietly
                        log.warning("portal connection lost: %s", exc)
                    return
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    log.warning("portal closed the connection")
                    return
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                if not self._handle(data.decode("utf-8", "replace"), join_ref, deliver):
                    return
        finally:
            with self._lock:
                self._ws, self._joined = None, False
            with contextlib.suppress(OSError, websocket.WebSocketException):
                ws.close(timeout=1)

    def _handle(self, text: str, join_ref: int, deliver: Deliver) -> bool:
        """False when the session must end (join refused, disconnect)."""
        frame = decode_frame(text)
        if frame is None:
            log.warning("malformed portal frame dropped")
            return True
        topic, event, payload, ref = frame
        if event == "phx_reply":
            if ref is not None and str(ref) == str(join_ref):
                status = payload.get("status") if isinstance(payload, dict) else None
                if status != "ok":
                    log.error("portal refused the join: %s", payload)
                    deliver(PORTAL_ERROR, {"reason": "join_refused"})
                    self._stop.set()
                    return False
                with self._lock:
                    self._joined = True
                    backlog, self._backlog = self._backlog, []
                    for queued in backlog:
                        self._send_locked(queued)
                log.info("joined topic %s", TOPIC)
            return True
        if topic != TOPIC:
            return True
        if event in ("phx_close", "phx_error", "disconnect"):
            log.warning("portal ended the channel: %s", event)
            return False
        deliver(event, payload)
        return True
