"""Log filter mapping, output formats and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from actors import logsetup
from actors.logsetup import OFF, TRACE, configure_logging, logger_levels, redact, register_secret
from gateway.config import ConfigError
from tests.support.secrets_scan import assert_no_secrets

pytestmark = pytest.mark.configures_logging

TOKEN = "SFMyNTY.g2gDaANtAAAAJGFiY2RlZi0xMjM0.bm90LWEtcmVhbC1zaWduYXR1cmU"
PSK = "e3kqBZ2wXH3lXv6dWq5Qm0Qzj9b3Yw8vQ2aJ1p4T6Xc="
TURN_PASSWORD = "t7Yk2bq9Zr4mWxPa"
PRIVATE_KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Logging configured into a buffer; restored to a quiet state afterwards."""
    stream = io.StringIO()
    yield stream
    configure_logging("info", "human", stream=io.StringIO())
    if logsetup._handler is not None:
        logging.getLogger().removeHandler(logsetup._handler)
        logsetup._handler = None
    for name in logsetup._configured:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.WARNING)


def test_levels_default_and_directives() -> None:
    levels = logger_levels("warn,gateway.wg=trace,pykka=info")
    assert levels[""] == logging.WARNING
    assert levels["gateway.wg"] == TRACE
    assert levels["pykka"] == logging.INFO
    assert levels["wire"] == OFF


def test_empty_filter_means_info() -> None:
    assert logger_levels("")[""] == logging.INFO


def test_rust_targets_map_to_our_loggers() -> None:
    levels = logger_levels("info,snownet=debug,boringtun=trace,wire::api::send=trace")
    assert levels["gateway.ice"] == levels["gateway.turn"] == logging.DEBUG
    assert levels["gateway.wg"] == TRACE
    assert levels["wire.api.send"] == TRACE
    assert levels["wire"] == OFF  # only the named wire target opens
    assert logger_levels("phoenix_channel=debug")["gateway.portal"] == logging.DEBUG


def test_pykka_quiet_unless_debug_or_named() -> None:
    assert logger_levels("info")["pykka"] == logging.WARNING
    assert "pykka" not in logger_levels("debug")
    assert logger_levels("debug,pykka=error")["pykka"] == logging.ERROR


def test_wire_off_unless_named_or_trace() -> None:
    assert logger_levels("debug")["wire"] == OFF
    assert "wire" not in logger_levels("trace")
    assert logger_levels("info,wire=debug")["wire"] == logging.DEBUG


def test_bad_filter_is_config_error(output: io.StringIO) -> None:
    with pytest.raises(ConfigError) as info:
        configure_logging("info,gateway=chatty", "human", stream=output)
    assert info.value.key == "log_filter"


def test_bad_format_is_config_error(output: io.StringIO) -> None:
    with pytest.raises(ConfigError) as info:
        configure_logging("info", "xml", stream=output)
    assert info.value.key == "log_format"


def test_filter_applies_to_output(output: io.StringIO) -> None:
    configure_logging("warn,gateway.portal=debug", "human", stream=output)
    logging.getLogger("gateway.portal.channel").debug("kept")
    logging.getLogger("gateway.wg").info("dropped")
    logging.getLogger("wire.api.send").debug("dropped wire")
    logging.getLogger("pykka").info("dropped pykka")
    text = output.getvalue()
    assert "kept" in text
    assert "dropped" not in text


def test_wire_logger_enabled_by_directive(output: io.StringIO) -> None:
    configure_logging("info,wire::api=trace", "human", stream=output)
    logging.getLogger("wire.api.recv").debug("frame")
    logging.getLogger("wire.net.recv").debug("packet")
    assert "frame" in output.getvalue()
    assert "packet" not in output.getvalue()


def test_reconfigure_resets_previous_levels(output: io.StringIO) -> None:
    configure_logging("info,gateway.wg=error", "human", stream=output)
    configure_logging("info", "human", stream=output)
    logging.getLogger("gateway.wg").info("visible again")
    assert output.getvalue().count("visible again") == 1  # one handler, not two


def test_human_format(output: io.StringIO) -> None:
    configure_logging("info", "human", stream=output)
    logging.getLogger("gateway.portal").warning("joined %s", "gateway", extra={"client_id": "c1"})
    line = output.getvalue().strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARN  gateway\.portal \[MainThread\] "
        r"joined gateway client_id=c1",
        line,
    ), line


def test_json_format(output: io.StringIO) -> None:
    configure_logging("info", "json", stream=output)
    logging.getLogger("actors.peer").info("hello", extra={"client_id": "c2", "actor": "Peer-1"})
    entry = json.loads(output.getvalue())
    assert entry["level"] == "INFO"
    assert entry["logger"] == "actors.peer"
    assert entry["thread"] == "MainThread"
    assert entry["message"] == "hello"
    assert entry["client_id"] == "c2" and entry["actor"] == "Peer-1"
    assert entry["ts"].endswith("Z")


def test_trace_level_is_below_debug(output: io.StringIO) -> None:
    configure_logging("debug", "human", stream=output)
    logging.getLogger("gateway.wg").log(TRACE, "too fine")
    configure_logging("trace", "human", stream=output)
    logging.getLogger("gateway.wg").log(TRACE, "fine enough")
    assert "too fine" not in output.getvalue()
    assert "TRACE gateway.wg" in output.getvalue()


LEAKY_MESSAGES = [
    ("GET wss://api.example.com/gateway/websocket?token=%s&external_id=x", (TOKEN,)),
    ("login with %s failed", (TOKEN,)),
    ('portal sent {"preshared_key": "%s", "id": 1}', (PSK,)),
    ("relay %r", ({"username": "1700:abc", "password": TURN_PASSWORD},)),
    ("turn credentials password=%s realm=firezone", (TURN_PASSWORD,)),
    ("our key is %s", (PRIVATE_KEY,)),
]


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_secrets_never_reach_the_output(output: io.StringIO, fmt: str) -> None:
    register_secret(PRIVATE_KEY)
    configure_logging("debug", fmt, stream=output)
    log = logging.getLogger("gateway.portal")
    for message, args in LEAKY_MESSAGES:
        log.info(message, *args)
    try:
        raise RuntimeError(f"connect failed for token {TOKEN}")
    except RuntimeError:
        log.exception("with traceback")
    text = output.getvalue()
    assert text.count("<redacted>") >= len(LEAKY_MESSAGES)
    assert "external_id=x" in text  # only the secret is masked, not the rest
    assert_no_secrets(text, [TOKEN, PSK, TURN_PASSWORD, PRIVATE_KEY])


def test_redact_keeps_harmless_text() -> None:
    assert redact("connected to relay 10.0.0.1:3478") == "connected to relay 10.0.0.1:3478"
    assert redact("username=1700:abc") == "username=1700:abc"


def test_short_secrets_are_not_registered() -> None:
    register_secret("ab")
    assert redact("ab cab") == "ab cab"


def test_secrets_scan_catches_a_leak() -> None:
    with pytest.raises(AssertionError) as info:
        assert_no_secrets("line one\nurl ?psk=" + quote(PSK, safe=""), [TOKEN, PSK])
    assert PSK not in str(info.value) and quote(PSK, safe="") not in str(info.value)
    assert "line 2" in str(info.value)
    with pytest.raises(AssertionError):
        assert_no_secrets(json.dumps({"k": PSK}), [PSK])
    assert_no_secrets("nothing to see", [TOKEN, PSK])


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_url_userinfo_never_reaches_the_output(output: io.StringIO, fmt: str) -> None:
    configure_logging("info", fmt, stream=output)
    logging.getLogger("gateway.test").info(
        "connecting to %s", "wss://admin:hunter2-pw@portal.test/gateway/websocket?x=1"
    )
    text = output.getvalue()
    assert "hunter2-pw" not in text and "admin" not in text
    assert "wss://<redacted>@portal.test/gateway/websocket?x=1" in text


FAKE = "2026-01-01T00:00:00.000Z INFO  gateway.node [Timer] operator says hi"


def test_a_remote_string_with_newlines_logs_as_one_line(output: io.StringIO) -> None:
    """A client-chosen domain cannot start a fake record (log injection)."""
    configure_logging("info", "human", stream=output)
    domain = f"evil.test\n{FAKE}\r\x1b[2J\x85\u2028\u202e"
    logging.getLogger("actors.peer").warning(
        "DNS resource %s refused", domain, extra={"client_id": "c\nid"}
    )
    text = output.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "evil.test\\n2026-01-01T00:00:00.000Z INFO" in text
    assert "\\r\\x1b[2J\\x85\\u2028\\u202e refused client_id=c\\nid" in text
    assert text.splitlines() == [text[:-1]]


def test_a_traceback_cannot_pass_for_a_record(output: io.StringIO) -> None:
    configure_logging("info", "human", stream=output)
    try:
        raise ValueError(f"bad domain\n{FAKE}")
    except ValueError:
        logging.getLogger("actors.peer").exception("lookup failed")
    first, *rest = output.getvalue().splitlines()
    assert first.endswith("lookup failed")
    assert rest and all(line.startswith("  ") for line in rest)


def test_json_lines_stay_one_line(output: io.StringIO) -> None:
    configure_logging("info", "json", stream=output)
    logging.getLogger("actors.peer").warning("domain %s", "a\nb\r\x85\u2028\u2029c")
    text = output.getvalue()
    assert len(text.splitlines()) == 1
    assert json.loads(text)["message"] == "domain a\nb\r\x85\u2028\u2029c"
