"""Start-up resolution of the API host (rust/phoenix-channel/src/login_url.rs,
rust/gateway/src/main.rs).

The host is resolved once before anything starts; a failure there is fatal (exit 1),
while failures on later connection attempts are transient (tests/integration/
test_portal_socket.py).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors import app
from actors.timer import Timer
from gateway.config import GatewayConfig
from gateway.exit_codes import ExitCode
from gateway.portal.login_url import LoginUrlPrototype

TOKEN = "startup-resolution-token"


class NoSuchHost:
    """A getaddrinfo that knows no names and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        self.asked.append((host, port))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> NoSuchHost:
    resolver = NoSuchHost()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


@pytest.fixture
def touched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and refuses) opening the TUN device or starting the timer."""
    seen: list[str] = []

    def refuse_tun(*args: Any, **kwargs: Any) -> Any:
        seen.append("tun")
        raise AssertionError("the TUN device must not be opened")

    def refuse_timer(self: Timer) -> None:
        seen.append("timer")
        raise AssertionError("the timer must not start")

    monkeypatch.setattr("actors.io.tun_linux.open_tun", refuse_tun)
    monkeypatch.setattr(Timer, "start", refuse_timer)
    return seen


def test_start_fails_before_anything_starts_when_the_host_does_not_resolve(
    no_dns: NoSuchHost, touched: list[str]
) -> None:
    config = GatewayConfig(token=TOKEN, api_url="wss://portal.invalid:8443", name="gw")
    with pytest.raises(OSError, match=r"portal\.invalid"):
        app.start(config, firezone_id="fz-id")
    assert no_dns.asked == [("portal.invalid", 8443)]
    assert touched == [] and pykka.ActorRegistry.get_all() == []


def test_run_exits_1_when_the_host_does_not_resolve(
    no_dns: NoSuchHost,
    touched: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr("actors.logsetup.configure_logging", lambda *args, **kwargs: None)
    caplog.set_level(logging.INFO, logger="actors.app")
    config = GatewayConfig(
        token=TOKEN,
        api_url="ws://portal.invalid",
        firezone_id="fz-id",
        name="gw",
        no_check=True,
        state_dir=str(tmp_path),
    )
    code = app.run(config)
    assert code == ExitCode.FATAL == 1
    assert "start-up failed" in caplog.text and "portal.invalid" in caplog.text
    assert TOKEN not in caplog.text and touched == []
    assert no_dns.asked == [("portal.invalid", 443)]  # 443 even for ws:// (bookkeeping)


@pytest.mark.parametrize("api_url", ["ws://127.0.0.1:8081", "ws://10.203.0.1:8081", "ws://[::1]"])
def test_address_literals_pass_the_start_up_resolution(api_url: str) -> None:
    """The dev stack's portal URLs are numeric: the system resolver needs no DNS for them."""
    app.resolve_api_host(LoginUrlPrototype.build(api_url, TOKEN, "fz-id", "gw"))
