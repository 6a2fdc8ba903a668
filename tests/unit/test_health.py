"""Health/readiness/metrics HTTP endpoints on loopback."""

from __future__ import annotations

import http.client
import logging
import socket
from collections.abc import Iterator

import pytest

from actors.health import HealthServer


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def server(readiness: Readiness) -> Iterator[HealthServer]:
    health = HealthServer(("127.0.0.1", 0), readiness, lambda: "firezone_portal_joined 1\n")
    health.start()
    assert health.address is not None
    yield health
    health.stop()


def _request(server: HealthServer, method: str, path: str) -> http.client.HTTPResponse:
    assert server.address is not None
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request(method, path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _body(server: HealthServer, path: str) -> tuple[int, bytes, str | None]:
    assert server.address is not None
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, response.getheader("Content-Type")


def test_healthz_is_200_empty(server: HealthServer) -> None:
    status, body, _ = _body(server, "/healthz")
    assert (status, body) == (200, b"")


def test_readyz_follows_readiness(server: HealthServer, readiness: Readiness) -> None:
    assert _body(server, "/readyz")[0] == 503
    readiness.ready = True
    assert _body(server, "/readyz")[0] == 200
    readiness.ready = False
    assert _body(server, "/readyz")[0] == 503
    assert _body(server, "/healthz")[0] == 200  # alive regardless


def test_metrics(server: HealthServer) -> None:
    status, body, content_type = _body(server, "/metrics")
    assert status == 200
    assert body == b"firezone_portal_joined 1\n"
    assert content_type is not None and content_type.startswith("text/plain; version=0.0.4")


def test_unknown_path_404(server: HealthServer) -> None:
    assert _body(server, "/nope")[0] == 404


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "BREW"])
def test_unknown_path_is_404_whatever_the_method(server: HealthServer, method: str) -> None:
    """The reference router has no fallback: an unrouted path is 404, not 405."""
    assert _request(server, method, "/nope").status == 404
    assert _request(server, method, "/healthz/extra").status == 404


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_other_methods_405(server: HealthServer, method: str, path: str) -> None:
    response = _request(server, method, path)
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def _head(server: HealthServer, path: str) -> tuple[int, bytes, dict[str, str]]:
    """A HEAD request, then a GET on the same connection: a stray body would be read as
    the GET's status line."""
    assert server.address is not None
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request("HEAD", path)
    response = conn.getresponse()
    body = response.read()  # http.client reads no body for HEAD, whatever the headers say
    headers = {k.lower(): v for k, v in response.getheaders()}
    conn.request("GET", "/healthz")
    follow_up = conn.getresponse()
    assert (follow_up.status, follow_up.read()) == (200, b"")
    conn.close()
    return response.status, body, headers


def test_head_healthz_is_200_without_body(server: HealthServer) -> None:
    status, body, headers = _head(server, "/healthz")
    assert (status, body, headers["content-length"]) == (200, b"", "0")


def test_head_readyz_and_metrics_answer_like_get(
    server: HealthServer, readiness: Readiness
) -> None:
    assert _head(server, "/readyz")[0] == 503
    readiness.ready = True
    assert _head(server, "/readyz")[0] == 200
    status, _, headers = _head(server, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["content-length"] == str(len(b"firezone_portal_joined 1\n"))


def test_405_with_a_body_does_not_poison_the_connection(server: HealthServer) -> None:
    """The unread request body must not be parsed as a next request."""
    assert server.address is not None
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 23\r\n\r\n"
            b"GET /nope HTTP/1.1\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 405 ")
    assert b"404" not in received


def test_failing_readiness_and_metrics(readiness: Readiness) -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    def not_sure() -> bool:
        raise RuntimeError("boom")

    health = HealthServer(("127.0.0.1", 0), not_sure, broken)
    health.start()
    try:
        assert _body(health, "/readyz")[0] == 503
        assert _body(health, "/metrics")[0] == 500
        assert _body(health, "/healthz")[0] == 200
    finally:
        health.stop()


def test_ipv6_loopback() -> None:
    health = HealthServer(("::1", 0), lambda: True, lambda: "")
    health.start()
    try:
        assert health.address is not None and health.address[0] == "::1"
        assert _body(health, "/readyz")[0] == 200
    finally:
        health.stop()


def test_bind_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        health = HealthServer(("127.0.0.1", port), lambda: True, lambda: "")
        with caplog.at_level(logging.ERROR, logger="actors.health"):
            health.start()
        assert health.address is None
        assert "cannot listen" in caplog.text
        health.stop()  # harmless


def test_stop_releases_the_port(server: HealthServer) -> None:
    assert server.address is not None
    port = server.address[1]
    server.stop()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
