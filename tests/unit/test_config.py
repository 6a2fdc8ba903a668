"""Configuration merge (flag > env > file > default) and validation messages."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import (
    ENV_VARS,
    FILE_KEYS,
    ConfigError,
    GatewayConfig,
    build_config,
    env_to_values,
    parse_log_filter,
    span_directive_warnings,
)

TOKEN = "SFMyNTY.g2gDbQAAACRhYmNkZWYtdG9rZW4.c2lnbmF0dXJl"
DEFAULTS = GatewayConfig(token=TOKEN)

#: key -> (value A, value B); A differs from B and from the default. Values are what a
#: YAML file or a flag would carry; ``_env`` turns them into environment strings.
VALUES: dict[str, tuple[Any, Any]] = {
    "api_url": ("wss://a.example.com", "https://b.example.com:8443/"),
    "firezone_id": ("id-a", "id-b"),
    "name": ("name-a", "name-b"),
    "log_filter": ("debug,pykka=info", "warn"),
    "log_format": ("json", "human"),
    "health_check_addr": ("127.0.0.1:9000", "[::1]:9001"),
    "control_socket": ("/tmp/a.sock", "/tmp/b.sock"),
    "state_dir": ("/srv/a", "/srv/b"),
    "tun_name": ("tun-a", "tun-b"),
    "icmp_prohibited": (True, False),
    "no_check": (True, False),
    "setup_host": (True, False),
    "network_change_reset": (False, True),
    "network_change_debounce": (0.5, 7),
    "telemetry": (True, False),
}
EXPECTED: dict[str, tuple[Any, Any]] = {
    "health_check_addr": (("127.0.0.1", 9000), ("::1", 9001)),
    "network_change_debounce": (0.5, 7.0),
}


def _env(key: str, value: Any) -> dict[str, str]:
    if key == "telemetry":
        return {"FIREZONE_NO_TELEMETRY": "false" if value else "true"}
    var = next(v for v, k in ENV_VARS.items() if k == key)
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return {var: text}


def _build(
    file: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
    **kwargs: Any,
) -> GatewayConfig:
    return build_config(file_values=file or {}, env=env or {}, flags=flags or {}, **kwargs)


def test_every_key_has_test_values() -> None:
    assert set(VALUES) == FILE_KEYS - {"token", "token_file"}


@pytest.mark.parametrize("key", sorted(VALUES))
def test_precedence_flag_env_file_default(key: str) -> None:
    a, b = VALUES[key]
    want_a, want_b = EXPECTED.get(key, (a, b))
    assert getattr(DEFAULTS, key) != want_a
    token = {"token": TOKEN}
    assert getattr(_build(file={**token, key: b}, env=_env(key, b), flags={key: a}), key) == want_a
    assert getattr(_build(file={**token, key: b}, env=_env(key, a)), key) == want_a
    assert getattr(_build(file={**token, key: b}, env=_env(key, a), flags={key: None}), key) == (
        want_a
    )
    assert getattr(_build(file={**token, key: a}), key) == want_a
    assert getattr(_build(file={**token, key: b}), key) == want_b
    assert getattr(_build(file=token), key) == getattr(DEFAULTS, key)


def test_token_precedence() -> None:
    flag, env, file = "tok-flag", "tok-env", "tok-file"
    assert _build({"token": file}, {"FIREZONE_TOKEN": env}, {"token": flag}).token == flag
    assert _build({"token": file}, {"FIREZONE_TOKEN": env}).token == env
    assert _build({"token": file}).token == file


def test_defaults() -> None:
    config = _build(env={"FIREZONE_TOKEN": TOKEN})
    assert config == DEFAULTS
    assert config.api_url == "wss://api.firezone.dev"
    assert config.health_check_addr == ("0.0.0.0", 8080)
    assert config.log_filter == "info"


def test_repr_redacts_token() -> None:
    text = repr(_build(env={"FIREZONE_TOKEN": TOKEN}))
    assert TOKEN not in text
    assert "token=<redacted>" in text


def test_empty_env_values_are_unset() -> None:
    config = _build(
        file={"firezone_id": "from-file"},
        env={"FIREZONE_TOKEN": TOKEN, "FIREZONE_ID": "", "FIREZONE_NAME": "  "},
    )
    assert config.firezone_id == "from-file"
    assert config.name is None


@pytest.mark.parametrize("value", ["google-cloud", "", "json", "human", "xml"])
def test_log_format_env_is_not_read(value: str) -> None:
    """The 1.4-era installer writes LOG_FORMAT=google-cloud; the 1.4 binary ignores it
    (rust/gateway/src/main.rs), so it neither fails start-up nor picks the format."""
    assert "LOG_FORMAT" not in ENV_VARS
    env = {"FIREZONE_TOKEN": TOKEN, "LOG_FORMAT": value}
    assert _build(env=env).log_format == "human"
    assert _build(env={**env, "FIREZONE_LOG_FORMAT": "json"}).log_format == "json"
    assert _build({"log_format": "json"}, env).log_format == "json"  # file still applies


@pytest.mark.parametrize("firezone_id", [" id-a ", "id-a\n", "id-a\r\n", " ", "\t\n"])
def test_firezone_id_is_used_exactly_as_given(firezone_id: str) -> None:
    """Untrimmed from every layer (rust/gateway/src/main.rs): it is hashed into external_id."""
    token = {"token": TOKEN}
    assert _build(token, {"FIREZONE_ID": firezone_id}).firezone_id == firezone_id
    assert _build(token, flags={"firezone_id": firezone_id}).firezone_id == firezone_id
    assert _build({**token, "firezone_id": firezone_id}).firezone_id == firezone_id


def test_only_an_empty_firezone_id_is_unset() -> None:
    token = {"token": TOKEN}
    assert _build(token, {"FIREZONE_ID": ""}).firezone_id is None
    assert _build({**token, "firezone_id": "f"}, {"FIREZONE_ID": ""}).firezone_id == "f"
    assert _build({**token, "firezone_id": "f"}, {"FIREZONE_ID": " "}).firezone_id == " "
    assert _build({**token, "firezone_id": ""}).firezone_id is None


def test_env_to_values_maps_real_gateway_variables() -> None:
    values = env_to_values(
        {
            "FIREZONE_TOKEN": "t",
            "FIREZONE_API_URL": "ws://api:8081",
            "FIREZONE_NO_TELEMETRY": "true",
            "HEALTH_CHECK_ADDR": "0.0.0.0:9999",
            "RUST_LOG": "debug",
            "UNRELATED": "x",
        }
    )
    assert values == {
        "token": "t",
        "api_url": "ws://api:8081",
        "telemetry": False,
        "health_check_addr": "0.0.0.0:9999",
        "log_filter": "debug",
    }


# --- token sources -----------------------------------------------------------------------


def test_token_file_from_each_layer() -> None:
    files = {"/f/flag": "tok-a\n", "/f/env": "  tok-b  \n", "/f/file": "tok-c"}
    read = files.__getitem__
    assert (
        _build(
            {"token_file": "/f/file"},
            {"FIREZONE_TOKEN_FILE": "/f/env"},
            {"token_file": "/f/flag"},
            read_token_file=read,
        ).token
        == "tok-a"
    )
    assert (
        _build(
            {"token_file": "/f/file"}, {"FIREZONE_TOKEN_FILE": "/f/env"}, read_token_file=read
        ).token
        == "tok-b"
    )
    assert _build({"token_file": "/f/file"}, read_token_file=read).token == "tok-c"


def test_token_beats_lower_layer_token_file() -> None:
    config = _build(
        {"token_file": "/nope"}, {"FIREZONE_TOKEN": "tok-env"}, read_token_file=_unreadable
    )
    assert config.token == "tok-env"


def test_credential_used_only_when_no_layer_names_a_token() -> None:
    assert _build(credential_token="cred-token\n").token == "cred-token"
    assert _build({"token": "tok-file"}, credential_token="cred-token").token == "tok-file"


def _unreadable(path: str) -> str:
    raise FileNotFoundError(2, "No such file or directory", path)


# --- error messages ------------------------------------------------------------------------


def _error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _build(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{info.value.key}: ")
    return info.value


@pytest.mark.parametrize(
    ("source", "key", "value", "fragment"),
    [
        ("file", "api_url", "ftp://api.example.com", "expected scheme ws, wss, http or https"),
        ("env", "api_url", "api.example.com", "expected scheme"),
        ("flags", "api_url", "wss://", "expected a URL with a host"),
        ("file", "api_url", "wss://host:99999", "port"),
        ("file", "health_check_addr", "abc", "expected HOST:PORT, got 'abc'"),
        ("env", "health_check_addr", "0.0.0.0:70000", "expected a port"),
        ("flags", "health_check_addr", "localhost:80", "IP address"),
        ("file", "no_check", "yes", "expected true or false"),
        ("env", "setup_host", "1", "expected true or false, got '1'"),
        ("file", "icmp_prohibited", 3, "expected true or false"),
        ("file", "log_filter", "info,gateway=loud", "log_filter: expected LEVEL or TARGET=LEVEL"),
        ("env", "log_filter", "foo[span=debug", "TARGET=LEVEL"),
        ("file", "log_format", "xml", "expected human or json, got 'xml'"),
        ("env", "log_format", "pretty", "expected human or json"),
        ("file", "tun_name", "a-very-long-interface-name", "interface name"),
        ("file", "state_dir", "relative/dir", "absolute path"),
        ("file", "control_socket", "/" + "x" * 120, "longer than 107 bytes"),
        ("file", "network_change_debounce", "soon", "expected seconds"),
        ("file", "network_change_debounce", -1, "between 0 and 3600"),
        ("file", "name", ["a", "list"], "expected a string"),
    ],
)
def test_bad_values_name_the_key(source: str, key: str, value: Any, fragment: str) -> None:
    layer = _env(key, value) if source == "env" else {key: value}
    kwargs: dict[str, Any] = {"file": {"token": TOKEN}, source: layer}
    if source == "file":
        kwargs["file"] = {"token": TOKEN, key: value}
    error = _error(**kwargs)
    assert error.key == key
    assert fragment in str(error)
    expected_source = {"file": "config file", "flags": "command line"}.get(
        source, next(iter(layer))
    )
    assert f"(from {expected_source})" in str(error)


def test_no_telemetry_env_accepts_only_true_false() -> None:
    error = _error(env={"FIREZONE_TOKEN": TOKEN, "FIREZONE_NO_TELEMETRY": "1"})
    assert error.key == "telemetry"
    assert "FIREZONE_NO_TELEMETRY" in str(error)


@pytest.mark.parametrize("value", [" true", "true ", "false\n", "\tfalse", " ", "TRUE"])
def test_no_telemetry_env_is_not_trimmed(value: str) -> None:
    """clap's boolean parser takes exactly ``true`` or ``false`` (rust/gateway/src/main.rs)."""
    error = _error(env={"FIREZONE_TOKEN": TOKEN, "FIREZONE_NO_TELEMETRY": value})
    assert error.key == "telemetry"
    assert f"got {value!r} (from FIREZONE_NO_TELEMETRY)" in str(error)


def test_no_telemetry_env_values() -> None:
    env = {"FIREZONE_TOKEN": TOKEN}
    assert _build(env={**env, "FIREZONE_NO_TELEMETRY": "true"}).telemetry is False
    assert _build(env={**env, "FIREZONE_NO_TELEMETRY": "false"}).telemetry is True
    assert _build(env={**env, "FIREZONE_NO_TELEMETRY": ""}) == DEFAULTS  # empty = unset


def test_unknown_file_key() -> None:
    error = _error(file={"token": TOKEN, "api_ulr": "wss://x"})
    assert error.key == "api_ulr"
    assert "unknown key" in str(error)


def test_missing_token() -> None:
    error = _error(file={"name": "gw"})
    assert error.key == "token"
    assert str(error).startswith("token: missing")


def test_token_and_token_file_in_one_layer() -> None:
    error = _error(file={"token": TOKEN, "token_file": "/x"})
    assert error.key == "token"


def test_token_errors_do_not_echo_the_secret() -> None:
    error = _error(flags={"token": "secret part"})
    assert "secret" not in str(error)
    assert "whitespace" in str(error)


def test_unreadable_token_file() -> None:
    error = _error(file={"token_file": "/etc/nope"}, read_token_file=_unreadable)
    assert error.key == "token_file"
    assert "'/etc/nope'" in str(error) and "No such file" in str(error)


def test_empty_token_file() -> None:
    error = _error(file={"token_file": "/t"}, read_token_file=lambda _p: "\n")
    assert error.key == "token_file"
    assert "empty" in str(error)


# --- log filter grammar -----------------------------------------------------------------


def test_parse_log_filter() -> None:
    parsed = parse_log_filter("info, gateway.wg=DEBUG,wire::api::send,pykka=warning")
    assert parsed.default == "info"
    assert parsed.directives == (
        ("gateway.wg", "debug"),
        ("wire::api::send", "trace"),
        ("pykka", "warn"),
    )
    assert parse_log_filter("").default is None


@pytest.mark.parametrize(
    "spec",
    [
        "info,=debug",
        "a b=info",
        "x=verbose",
        "9x",
        # malformed span directives are still errors
        "x[y=info",
        "x]y=info",
        "x[y]z=info",
        "x[y][z]=info",
        "x[y]=verbose",
        "x[y]=",
        "9x[y]=info",
    ],
)
def test_parse_log_filter_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_log_filter(spec)
    assert info.value.key == "log_filter"


@pytest.mark.parametrize(
    ("directive", "applied"),
    [
        ("snownet[connection]=debug", ("snownet", "debug")),
        ("snownet[connection{id=7}]=DEBUG", ("snownet", "debug")),
        ("firezone_tunnel[{cid}]=trace", ("firezone_tunnel", "trace")),
        ("wire::api[send] = warn", ("wire::api", "warn")),
        ("str0m[x]", ("str0m", "trace")),  # no level: everything, like a bare target
    ],
)
def test_span_directives_apply_their_target_and_level(
    directive: str, applied: tuple[str, str]
) -> None:
    """Valid EnvFilter syntax for the Rust gateway (rust/logging/src/lib.rs): we have no spans, so
    the directive applies to its whole target instead of stopping the gateway."""
    parsed = parse_log_filter(f"info,{directive},pykka=warn")
    assert parsed.default == "info"
    assert parsed.directives == (applied, ("pykka", "warn"))
    assert parsed.span_directives == ((directive, f"{applied[0]}={applied[1]}"),)
    (warning,) = span_directive_warnings(f"info,{directive}")
    assert repr(directive) in warning and repr(f"{applied[0]}={applied[1]}") in warning
    config = _build(env={"FIREZONE_TOKEN": TOKEN, "RUST_LOG": f"info,{directive}"})
    assert config.log_filter == f"info,{directive}"


def test_span_directive_without_target_applies_nothing() -> None:
    parsed = parse_log_filter("warn,[connection]=debug")
    assert (parsed.default, parsed.directives) == ("warn", ())
    assert parsed.span_directives == (("[connection]=debug", None),)
    (warning,) = span_directive_warnings("warn,[connection]=debug")
    assert "ignored" in warning


def test_plain_directives_unchanged_and_not_warned() -> None:
    spec = "info,gateway.wg=debug,wire::api::send,pykka=warning"
    parsed = parse_log_filter(spec)
    assert parsed.span_directives == ()
    assert span_directive_warnings(spec) == []
