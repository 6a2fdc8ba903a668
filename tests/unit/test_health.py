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


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "BREW"])
def test_other_methods_405(server: HealthServer, method: str) -> None:
    response = _request(server, method, "/healthz")
    assert response.status == 405
    assert response.getheader("Allow") == "GET"


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
