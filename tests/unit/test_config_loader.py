"""The IO around the config core: YAML file, token files, systemd credential."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from actors.config_loader import load_config, read_config_file
from gateway.config import ENV_VARS, FILE_KEYS, ConfigError, GatewayConfig, build_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.yaml"


@pytest.fixture(autouse=True)
def _no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the machine's /etc/firezone/gateway.yaml."""
    monkeypatch.setattr("actors.config_loader.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))


def test_yaml_file_values(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("token: tok-file\nhealth_check_addr: '[::]:8081'\nsetup_host: true\n")
    config = load_config(config_path=str(path), flags={}, env={})
    assert config.token == "tok-file"
    assert config.health_check_addr == ("::", 8081)
    assert config.setup_host is True


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(tmp_path / "nope.yaml"), flags={"token": "t"}, env={})
    assert info.value.key == "config"
    assert "not found" in str(info.value)


def test_missing_default_file_is_fine() -> None:
    assert load_config(config_path=None, flags={"token": "t"}, env={}).token == "t"


def test_firezone_config_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("name: from-env-file\n")
    config = load_config(config_path=None, flags={"token": "t"}, env={"FIREZONE_CONFIG": str(path)})
    assert config.name == "from-env-file"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("token: [unclosed\n", "not valid YAML at line"), ("- a\n- b\n", "mapping")],
)
def test_bad_yaml(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_config_file(str(path), required=True)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_yaml_is_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("# only comments\n")
    assert read_config_file(str(path), required=True) == {}


def test_token_file_flag_env_and_yaml(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    yaml_path = tmp_path / "gw.yaml"
    yaml_path.write_text(f"token_file: {token_file}\n")
    assert load_config(config_path=str(yaml_path), flags={}, env={}).token == "tok-from-file"
    env = {"FIREZONE_TOKEN_FILE": str(token_file)}
    assert load_config(config_path=str(yaml_path), flags={}, env=env).token == "tok-from-file"
    flags = {"token_file": str(token_file)}
    assert load_config(config_path=str(yaml_path), flags=flags, env={}).token == "tok-from-file"


def test_firezone_token_naming_a_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-via-path")
    config = load_config(config_path=None, flags={}, env={"FIREZONE_TOKEN": str(token_file)})
    assert config.token == "tok-via-path"


def test_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "FIREZONE_TOKEN").write_text("  tok-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert load_config(config_path=None, flags={}, env=env).token == "tok-credential"
    # An explicit token wins over the credential.
    env["FIREZONE_TOKEN"] = "tok-env"
    assert load_config(config_path=None, flags={}, env=env).token == "tok-env"


def test_unreadable_token_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_path=None, flags={"token_file": str(tmp_path / "x")}, env={})
    assert info.value.key == "token_file"


def test_example_yaml_documents_every_key_with_its_default() -> None:
    """Uncommenting every ``# key: value`` line of the example must give the defaults."""
    text = EXAMPLE.read_text()
    assert read_config_file(str(EXAMPLE), required=True) == {}  # everything commented out
    documented: dict[str, object] = {}
    for line in text.splitlines():
        match = re.match(r"^# ([a-z_]+): (.*)$", line)
        if match and match.group(1) in FILE_KEYS:
            documented.update(yaml.safe_load(f"{match.group(1)}: {match.group(2)}"))
    assert set(documented) == set(FILE_KEYS), set(FILE_KEYS) ^ set(documented)
    for var in ENV_VARS:
        assert var in text, var
    documented.pop("token_file")
    documented["token"] = "t"
    config = build_config(file_values=documented, env={}, flags={})
    assert config == GatewayConfig(token="t")


def test_example_yaml_names_only_variables_that_are_read() -> None:
    """Each ``env`` line names a variable the gateway reads (e.g. not LOG_FORMAT, which the
    1.4 gateway ignores, rust/gateway/src/main.rs)."""
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("#   env "):
            variables = line.removeprefix("#   env ").split(", flag")[0]
            for var in re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", variables):
                assert var in ENV_VARS, line


def test_span_directive_is_loaded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """RUST_LOG=snownet[connection]=debug is valid for the Rust gateway: start, and warn."""
    env = {"FIREZONE_TOKEN": "t", "RUST_LOG": "info,snownet[connection]=debug"}
    with caplog.at_level(logging.WARNING, logger="actors.config_loader"):
        config = load_config(config_path=None, flags={}, env=env)
    assert config.log_filter == "info,snownet[connection]=debug"
    (record,) = caplog.records
    assert "'snownet[connection]=debug'" in record.getMessage()
    assert "applying 'snownet=debug'" in record.getMessage()


def test_plain_filter_loads_without_warning(caplog: pytest.LogCaptureFixture) -> None:
    env = {"FIREZONE_TOKEN": "t", "RUST_LOG": "info,snownet=debug"}
    with caplog.at_level(logging.WARNING, logger="actors.config_loader"):
        load_config(config_path=None, flags={}, env=env)
    assert caplog.records == []
