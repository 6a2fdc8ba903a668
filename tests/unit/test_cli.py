"""The command line: run's flags reach the config, exit codes, status/reset over the socket."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import cli
from actors.control import ControlServer
from gateway import COMPATIBLE_FIREZONE_VERSION, __version__
from gateway.config import ENV_VARS, GatewayConfig
from gateway.exit_codes import ExitCode

STATUS: dict[str, Any] = {
    "portal": {"state": "joined", "joined_since": 1_700_000_000.0, "reconnects": 2},
    "public_key": "pubkeyAAAA=",
    "relays": [
        {
            "id": "relay-1",
            "server": "203.0.113.5:3478",
            "relay_addresses": ["203.0.113.5:50000"],
            "state": "allocated",
        }
    ],
    "clients": [
        {
            "client_id": "client-1",
            "path": "relay:relay-1",
            "remote": "198.51.100.7:51820",
            "last_handshake": 1_700_000_090.0,
            "rx_bytes": 2048,
            "tx_bytes": 5 * 1024 * 1024,
            "resources": [{"id": "r1", "name": "intranet", "expires_at": 1_700_003_600.0}],
        }
    ],
}


class RunRecorder:
    def __init__(self) -> None:
        self.configs: list[GatewayConfig] = []

    def __call__(
        self, config: GatewayConfig, reload: Callable[[], GatewayConfig] | None = None
    ) -> int:
        self.configs.append(config)
        self.reload = reload
        return 0


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunRecorder:
    """Replace actors.app.run; isolate from the host's environment and config file."""
    import actors.app

    recorder = RunRecorder()
    monkeypatch.setattr(actors.app, "run", recorder)
    monkeypatch.setattr("actors.config_loader.DEFAULT_CONFIG_PATH", str(tmp_path / "none.yaml"))
    for var in (*ENV_VARS, "FIREZONE_CONFIG", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    return recorder


@pytest.mark.parametrize("argv", [["--version"], ["-V"], ["run", "-V"], ["run", "--version"]])
def test_version_is_the_references(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Exactly ``firezone-gateway 1.4.0`` (rust/gateway/src/main.rs), what a drop-in is checked
    by."""
    assert COMPATIBLE_FIREZONE_VERSION == "1.4.0"
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "firezone-gateway 1.4.0\n"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--health-check-addr" in out
    assert f"pyfz-gateway {__version__}" in " ".join(out.split())  # our own version


def test_run_passes_flags(run: RunRecorder) -> None:
    code = cli.main(
        [
            "run",
            "tok-positional",
            "-u",
            "ws://127.0.0.1:8081",
            "-n",
            "gw-1",
            "-i",
            "id-1",
            "--no-telemetry",
            "--health-check-addr",
            "127.0.0.1:9090",
            "--log-filter",
            "debug",
            "--log-format",
            "json",
            "--no-check",
            "--setup-host",
            "--icmp-prohibited",
            "--control-socket",
            "/tmp/x.sock",
            "--state-dir",
            "/tmp/state",
            "--tun-name",
            "tun-t",
            "--no-network-change-reset",
            "--network-change-debounce",
            "0.5",
        ]
    )
    assert code == 0
    (config,) = run.configs
    assert config == GatewayConfig(
        token="tok-positional",
        api_url="ws://127.0.0.1:8081",
        name="gw-1",
        firezone_id="id-1",
        telemetry=False,
        health_check_addr=("127.0.0.1", 9090),
        log_filter="debug",
        log_format="json",
        no_check=True,
        setup_host=True,
        icmp_prohibited=True,
        control_socket="/tmp/x.sock",
        state_dir="/tmp/state",
        tun_name="tun-t",
        network_change_reset=False,
        network_change_debounce=0.5,
    )


def test_run_is_the_default_command(run: RunRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREZONE_TOKEN", "tok-env")
    monkeypatch.setenv("RUST_LOG", "warn")
    assert cli.main([]) == 0
    assert run.configs[0].token == "tok-env"
    assert run.configs[0].log_filter == "warn"
    assert run.configs[0].no_check is False  # unset store_true flags do not override


def test_flag_beats_env_beats_file(
    run: RunRecorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("token: tok-file\nname: file-name\nlog_format: json\n")
    monkeypatch.setenv("FIREZONE_NAME", "env-name")
    assert cli.main(["--config", str(path), "-n", "flag-name"]) == 0
    assert cli.main(["--config", str(path)]) == 0
    assert [c.name for c in run.configs] == ["flag-name", "env-name"]
    assert run.configs[0].log_format == "json"


def test_run_exit_code_is_apps(run: RunRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    import actors.app

    monkeypatch.setattr(actors.app, "run", lambda config, reload: int(ExitCode.AUTH_REJECTED))
    assert cli.main(["tok"]) == ExitCode.AUTH_REJECTED


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        ([], "token"),
        (["tok", "-u", "ftp://x"], "api_url"),
        (["tok", "--health-check-addr", "abc"], "health_check_addr"),
        (["tok", "--log-format", "xml"], "log_format"),
        (["tok", "--log-filter", "info,x=loud"], "log_filter"),
        (["tok", "--config", "/nonexistent/gateway.yaml"], "config"),
    ],
)
def test_config_errors_are_one_line_and_usage_exit(
    run: RunRecorder, capsys: pytest.CaptureFixture[str], argv: list[str], key: str
) -> None:
    assert cli.main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"firezone-gateway: error: {key}: ")
    assert run.configs == []


def test_unknown_flag_is_usage_error(run: RunRecorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--frobnicate"]) == ExitCode.USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


def test_bad_no_telemetry_env_is_usage_error(
    run: RunRecorder, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FIREZONE_NO_TELEMETRY", "1")
    assert cli.main(["tok"]) == ExitCode.USAGE
    assert "FIREZONE_NO_TELEMETRY" in capsys.readouterr().err


def test_installer_log_format_does_not_stop_the_gateway(
    run: RunRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1.4-era systemd installer writes LOG_FORMAT=google-cloud; 1.4 never reads it."""
    monkeypatch.setenv("LOG_FORMAT", "google-cloud")
    assert cli.main(["tok"]) == 0
    assert run.configs[0].log_format == "human"


@pytest.mark.parametrize("value", [" true", "false "])
def test_no_telemetry_env_is_not_trimmed(
    run: RunRecorder,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FIREZONE_NO_TELEMETRY", value)
    assert cli.main(["tok"]) == ExitCode.USAGE
    assert "FIREZONE_NO_TELEMETRY" in capsys.readouterr().err


def test_rust_log_span_directive_starts_the_gateway(
    run: RunRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tracing's EnvFilter accepts span directives; they must not exit with 2."""
    monkeypatch.setenv("RUST_LOG", "info,snownet[connection]=debug")
    assert cli.main(["tok"]) == 0
    assert run.configs[0].log_filter == "info,snownet[connection]=debug"


def test_firezone_id_reaches_the_gateway_untrimmed(
    run: RunRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["tok", "-i", " flag-id "]) == 0
    monkeypatch.setenv("FIREZONE_ID", "env-id\n")
    assert cli.main(["tok"]) == 0
    assert [c.firezone_id for c in run.configs] == [" flag-id ", "env-id\n"]


# --- status and reset ------------------------------------------------------------------------


@pytest.fixture
def gateway_socket() -> Iterator[tuple[str, list[str]]]:
    base = tempfile.mkdtemp(prefix="fzcli-", dir="/tmp")
    path = str(Path(base) / "run" / "control.sock")
    commands: list[str] = []

    def status() -> dict[str, Any]:
        commands.append("status")
        return STATUS

    def reset() -> dict[str, Any]:
        commands.append("reset")
        return {"ok": True}

    server = ControlServer(path, {"status": status, "reset": reset})
    server.start()
    yield path, commands
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_status_json(
    gateway_socket: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = gateway_socket
    assert cli.main(["status", "--json", "--control-socket", path]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_table(
    gateway_socket: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = gateway_socket
    monkeypatch.setenv("FIREZONE_CONTROL_SOCKET", path)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Portal:      joined since 2023-11-14 22:13:20Z" in out
    assert "2 reconnects" in out
    assert "relay-1" in out and "203.0.113.5:50000" in out and "allocated" in out
    assert "client-1" in out and "relay:relay-1" in out and "198.51.100.7:51820" in out
    assert "2.0 KiB" in out and "5.0 MiB" in out
    assert "intranet (until 2023-11-14 23:13:20Z)" in out


def test_render_status_tolerates_missing_keys() -> None:
    out = io.StringIO()
    cli.render_status({"clients": [{"client_id": "c"}], "relays": [{}]}, out, now=0.0)
    text = out.getvalue()
    assert "Portal:      -" in text
    assert "Public key:  -" in text
    assert "Clients:     1" in text
    out = io.StringIO()
    cli.render_status({}, out, now=0.0)
    assert "Relays:      0" in out.getvalue()


def test_reset(gateway_socket: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    path, commands = gateway_socket
    assert cli.main(["reset", "--control-socket", path]) == 0
    assert commands == ["reset"]
    assert "reset requested" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["status", "reset"])
def test_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    code = cli.main([command, "--control-socket", str(tmp_path / "none.sock")])
    assert code == ExitCode.FATAL
    err = capsys.readouterr().err
    assert "the gateway is not running" in err and err.count("\n") == 1


def test_status_error_reply(capsys: pytest.CaptureFixture[str]) -> None:
    base = tempfile.mkdtemp(prefix="fzcli-", dir="/tmp")
    path = str(Path(base) / "control.sock")
    server = ControlServer(path, {"reset": lambda: {"ok": True}})
    server.start()
    try:
        assert cli.main(["status", "--control-socket", path]) == ExitCode.FATAL
        assert "unknown command 'status'" in capsys.readouterr().err
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_sighup_reload_reads_the_same_sources_again(
    run: RunRecorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("token: file-token-abcdef\nlog_filter: info\n")
    assert cli.main(["run", "--config", str(config), "--log-format", "json"]) == 0
    assert run.configs[0].log_filter == "info"
    config.write_text("token: file-token-abcdef\nlog_filter: debug,pykka=info\n")
    assert run.reload is not None
    fresh = run.reload()
    assert fresh.log_filter == "debug,pykka=info"
    assert fresh.log_format == "json", "flags still win after a reload"
