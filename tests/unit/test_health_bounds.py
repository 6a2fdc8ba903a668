"""The health port holds a bounded number of connections and threads, each for a bounded
time and request size: idle or trickling connections cannot keep a probe out."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from actors.health import MAX_CONNECTIONS, MAX_REQUEST_BYTES, HealthServer


def _serve(**bounds: float) -> HealthServer:
    health = HealthServer(("127.0.0.1", 0), lambda: True, lambda: "m 1\n", **bounds)  # type: ignore[arg-type]
    health.start()
    assert health.address is not None
    return health


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _connect(health: HealthServer, opened: list[socket.socket]) -> socket.socket:
    assert health.address is not None
    sock = socket.create_connection(health.address, timeout=5)
    opened.append(sock)
    return sock


def _healthz(health: HealthServer) -> int:
    assert health.address is not None
    conn = http.client.HTTPConnection(*health.address, timeout=5)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _wait_for(predicate: object, timeout: float = 5.0) -> bool:
    """Poll a condition the server reaches on its own threads (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_idle_connections_beyond_the_cap_neither_add_threads_nor_block_a_probe(
    opened: list[socket.socket],
) -> None:
    health = _serve(read_timeout=60.0)  # idle connections would stay for a minute
    try:
        before = threading.active_count()
        for _ in range(3 * MAX_CONNECTIONS):
            _connect(health, opened)
        # every connection was accepted: those beyond the cap each closed an idle one
        assert _wait_for(lambda: health.evicted() + health.refused() == 2 * MAX_CONNECTIONS)
        assert health.refused() == 0  # there was always an idle one to close
        assert _wait_for(lambda: health.connections() <= MAX_CONNECTIONS)
        assert threading.active_count() - before <= MAX_CONNECTIONS + 1
        assert _healthz(health) == 200
        assert _healthz(health) == 200
        assert health.connections() <= MAX_CONNECTIONS
        # the oldest idle connections were closed to make room
        opened[0].settimeout(5)
        assert opened[0].recv(1) == b""
    finally:
        health.stop()
    assert _wait_for(lambda: threading.active_count() <= before)


def test_an_idle_connection_is_closed_after_the_read_timeout(
    opened: list[socket.socket],
) -> None:
    health = _serve(read_timeout=0.3)
    try:
        sock = _connect(health, opened)
        started = time.monotonic()
        assert sock.recv(1) == b""  # the server closed it (the socket's own timeout is 5 s)
        assert time.monotonic() - started < 4
        assert _wait_for(lambda: health.connections() == 0)
    finally:
        health.stop()


def test_a_trickled_request_is_cut_at_the_deadline(opened: list[socket.socket]) -> None:
    """A byte at a time restarts a plain socket timeout; the request's deadline does not."""
    health = _serve(read_timeout=0.5)
    try:
        sock = _connect(health, opened)
        started = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.05)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
        assert closed, "the connection outlived its deadline"
        assert time.monotonic() - started < 4
    finally:
        health.stop()


def test_request_size_is_bounded(opened: list[socket.socket]) -> None:
    health = _serve()
    try:
        sock = _connect(health, opened)
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(60))
        assert len(headers) > MAX_REQUEST_BYTES
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
        answer = sock.recv(1024)
        assert answer.startswith(b"HTTP/1.") and b" 431 " in answer.split(b"\r\n")[0]
        long_line = _connect(health, opened)
        long_line.sendall(b"GET /" + b"a" * (2 * MAX_REQUEST_BYTES) + b" HTTP/1.1\r\n\r\n")
        first = long_line.recv(1024).split(b"\r\n")[0]
        assert b" 414 " in first or b" 400 " in first
        assert _healthz(health) == 200
    finally:
        health.stop()
