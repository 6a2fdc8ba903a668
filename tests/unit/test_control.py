"""Control socket server and client with stub handlers."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from actors import app
from actors.control import ControlError, ControlServer, ControlSocketBusy, control_request

STATUS = {"portal": {"state": "joined", "joined_since": 1.0, "reconnects": 0}, "clients": []}


class Calls:
    def __init__(self) -> None:
        self.resets = 0

    def status(self) -> dict[str, Any]:
        return STATUS

    def reset(self) -> dict[str, Any]:
        self.resets += 1
        return {"ok": True}

    def broken(self) -> dict[str, Any]:
        raise RuntimeError("handler blew up")


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A short path (sun_path is 107 bytes; pytest's tmp_path can be longer)."""
    base = tempfile.mkdtemp(prefix="fzctl-", dir="/tmp")
    yield str(Path(base) / "run" / "control.sock")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def server(sock_path: str, calls: Calls) -> Iterator[ControlServer]:
    control = ControlServer(
        sock_path, {"status": calls.status, "reset": calls.reset, "broken": calls.broken}
    )
    control.start()
    yield control
    control.stop()


def test_status_and_reset(server: ControlServer, sock_path: str, calls: Calls) -> None:
    assert control_request(sock_path, "status") == STATUS
    assert control_request(sock_path, "reset") == {"ok": True}
    assert calls.resets == 1


def test_permissions(server: ControlServer, sock_path: str) -> None:
    socket_mode = Path(sock_path).stat().st_mode
    assert stat.S_ISSOCK(socket_mode)
    assert stat.S_IMODE(socket_mode) == 0o600
    assert stat.S_IMODE(Path(sock_path).parent.stat().st_mode) == 0o700


def test_unknown_command(server: ControlServer, sock_path: str) -> None:
    response = control_request(sock_path, "explode")
    assert "unknown command 'explode'" in response["error"]


def test_handler_exception_is_an_error_and_server_survives(
    server: ControlServer, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = control_request(sock_path, "broken")
    assert "handler blew up" in response["error"]
    assert "control command 'broken' failed" in caplog.text
    assert control_request(sock_path, "status") == STATUS


def test_malformed_requests_and_several_per_connection(
    server: ControlServer, sock_path: str
) -> None:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(sock_path)
        stream = client.makefile("rwb")
        for request in (b"not json\n", b'["status"]\n', b'{"command": "status"}\n'):
            stream.write(request)
            stream.flush()
            responses = json.loads(stream.readline())
            if request.startswith(b"{"):
                assert responses == STATUS
            else:
                assert "error" in responses


def test_not_running(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as info:
        control_request(str(tmp_path / "none.sock"), "status")
    assert str(info.value).startswith("the gateway is not running")


def test_stop_removes_socket(sock_path: str, calls: Calls) -> None:
    control = ControlServer(sock_path, {"status": calls.status})
    control.start()
    control.stop()
    assert not Path(sock_path).exists()
    with pytest.raises(ControlError, match="not running"):
        control_request(sock_path, "status")


def test_refuses_to_start_when_another_gateway_answers(
    server: ControlServer, sock_path: str, calls: Calls
) -> None:
    second = ControlServer(sock_path, {"status": calls.status})
    with pytest.raises(ControlSocketBusy, match="already running"):
        second.start()
    assert control_request(sock_path, "status") == STATUS  # the first one is untouched


def test_replaces_a_stale_socket(sock_path: str, calls: Calls) -> None:
    Path(sock_path).parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # file stays, nobody listens
    control = ControlServer(sock_path, {"status": calls.status})
    control.start()
    try:
        assert control_request(sock_path, "status") == STATUS
    finally:
        control.stop()


def test_refuses_to_replace_a_regular_file(sock_path: str, calls: Calls) -> None:
    Path(sock_path).parent.mkdir(mode=0o700)
    Path(sock_path).write_text("precious")
    try:
        with pytest.raises(ControlError, match="not a socket"):
            ControlServer(sock_path, {"status": calls.status}).start()
        assert Path(sock_path).read_text() == "precious"
    finally:
        Path(sock_path).unlink()


def _runtime(path: str) -> SimpleNamespace:
    """What app._start_control needs of a Runtime."""
    return SimpleNamespace(config=SimpleNamespace(control_socket=path), closers=[],
                           status=lambda: STATUS, reset=lambda: {"ok": True})


def test_a_control_socket_that_cannot_be_made_only_costs_status_and_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-root CAP_NET_ADMIN service may not create /run/firezone-gateway: the 1.4
    gateway has no control socket, so this one runs on without it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runtime = _runtime(str(blocker / "control.sock"))  # its directory cannot exist
    app._start_control(runtime)  # type: ignore[arg-type]
    assert runtime.closers == []
    assert "running without status and reset" in caplog.text


def test_another_gateway_on_the_control_socket_is_still_fatal(
    server: ControlServer, sock_path: str
) -> None:
    with pytest.raises(ControlSocketBusy):
        app._start_control(_runtime(sock_path))  # type: ignore[arg-type]
