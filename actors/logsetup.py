"""Logging set-up: a RUST_LOG-style filter, human or JSON lines, and secret redaction.

Filter semantics (like tracing's EnvFilter): a bare level sets the default
(``info``), ``TARGET=LEVEL`` sets a logger and its children, a bare ``TARGET`` enables it
fully. ``trace`` is a TRACE level (5) below DEBUG. Targets are logger names; the Rust
targets operators already use are mapped to ours:

===================  ===========================================================
Rust target          our loggers
===================  ===========================================================
firezone_gateway     actors
firezone_tunnel      gateway
snownet              gateway.node, gateway.ice, gateway.stun, gateway.turn
phoenix_channel      gateway.portal, actors.portal
boringtun            gateway.wg
str0m                gateway.ice
wire::api::send      wire.api.send (likewise wire::api::recv, wire::net::*, wire::dev::*)
===================  ===========================================================

Any other ``a::b`` target becomes ``a.b``. Two loggers are quiet unless asked for: the
``wire`` loggers (raw frames/packets, logged at DEBUG) are off unless a directive names
them or the default is ``trace``; ``pykka`` is WARNING unless named or the default is
``debug``/``trace``.

Redaction runs on the handler, after formatting, so neither a message, its arguments
nor a traceback can carry a token, a key or a TURN password to the output.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

from gateway.config import parse_log_filter

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: Above CRITICAL: nothing passes.
OFF = logging.CRITICAL + 10
_LEVELS = {
    "off": OFF,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
RUST_TARGETS: dict[str, tuple[str, ...]] = {
    "firezone_gateway": ("actors",),
    "firezone_tunnel": ("gateway",),
    "snownet": ("gateway.node", "gateway.ice", "gateway.stun", "gateway.turn"),
    "phoenix_channel": ("gateway.portal", "actors.portal"),
    "boringtun": ("gateway.wg",),
    "str0m": ("gateway.ice",),
}
#: Loggers with their own default, applied unless a directive names them.
WIRE_LOGGER = "wire"
PYKKA_LOGGER = "pykka"
#: Extra record attributes that are shown when present.
EXTRA_FIELDS = ("client_id", "actor")

REDACTED = "<redacted>"
#: Registered secrets shorter than this are ignored: masking "ab" everywhere helps nobody.
MIN_SECRET_LENGTH = 6

_SECRET_KEYS = r"(?:preshared_key|private_key|password|token|secret|psk)"
_PATTERNS = (
    # ?token=…, token=…, password=… in URLs and key=value text
    (re.compile(rf"(\b{_SECRET_KEYS}=)[^&\s,;\"'<>]+", re.IGNORECASE), rf"\1{REDACTED}"),
    # "password": "…" (JSON) and 'password': '…' (Python reprs)
    (
        re.compile(rf"([\"']{_SECRET_KEYS}[\"']\s*:\s*)([\"'])(?:\\.|(?!\2).)*\2", re.IGNORECASE),
        rf"\1\2{REDACTED}\2",
    ),
    # Phoenix.Token-style signed tokens (base64 of "SFMyNTY" = "HMA256" prefix)
    (re.compile(r"SFMyNTY\.[A-Za-z0-9_\-.=]+"), REDACTED),
    # user:password@ in URLs (an API URL with userinfo), wherever a URL is logged
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>]*@"), rf"\1{REDACTED}@"),
)

_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None
_secrets_lock = threading.Lock()
_configured: list[str] = []  # logger names whose level we set, reset on reconfiguration
_handler: logging.Handler | None = None


def register_secret(secret: str) -> None:
    """Mask ``secret`` wherever it appears in log output from now on."""
    global _secrets_re
    if len(secret) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        _secrets.add(secret)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def registered_secrets() -> frozenset[str]:
    """Secrets registered so far (for the test suite's leak scan)."""
    with _secrets_lock:
        return frozenset(_secrets)


def redact(text: str) -> str:
    """``text`` with registered secrets and secret-looking values masked."""
    pattern = _secrets_re
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level_name(record: logging.LogRecord) -> str:
    return "WARN" if record.levelno == logging.WARNING else record.levelname


#: How the human format writes the characters it escapes (the rest as \\xNN, \\uNNNN).
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Characters a JSON string may hold raw that line readers (``str.splitlines``) break at.
_JSON_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _escape_char(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else (
        f"\\U{code:08x}")


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (CR, LF and other C0/C1
    controls, line and paragraph separators, bidi overrides...), so remote strings in a
    message (a client's domain, a portal's reason) can neither start a fake log line nor
    hide text."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


class HumanFormatter(logging.Formatter):
    """``2024-10-30T12:00:00.000Z INFO  gateway.portal [PortalActor] joined client_id=…``.

    One record is one line: the message and extras go through :func:`one_line`. A
    traceback or stack follows on lines of its own, each indented by two spaces and
    escaped the same way, so no line of it can pass for a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {_level_name(record):<5} {record.name} "
            f"[{record.threadName}] {record.getMessage()}"
        )
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line += f" {name}={value}"
        line = one_line(line)
        if record.exc_info:
            line += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += _indented(self.formatStack(record.stack_info))
        return redact(line)


def _indented(text: str) -> str:
    return "".join(f"\n  {one_line(part)}" for part in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One flat JSON object per line: ts, level, logger, thread, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": _level_name(record),
            "logger": record.name,
            "thread": record.threadName,
            "message": redact(record.getMessage()),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                is_plain = isinstance(value, (int, float, bool))
                entry[name] = value if is_plain else redact(str(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        # Values are redacted before serialising: JSON escaping would hide quoted keys.
        # json.dumps escapes C0 controls; NEL and U+2028/9 may stay raw in JSON but
        # split the line for readers that honour them, so they are escaped too.
        text = json.dumps(entry, ensure_ascii=False, default=str)
        return text if text.isascii() else text.translate(_JSON_LINE_BREAKS)


def map_target(target: str) -> tuple[str, ...]:
    """Our logger names for a filter target (Rust or Python spelling)."""
    if target in RUST_TARGETS:
        return RUST_TARGETS[target]
    return (target.replace("::", "."),)


def logger_levels(filter_spec: str) -> dict[str, int]:
    """Logger name -> level for ``filter_spec`` ("" is the root logger).

    Raises :class:`gateway.config.ConfigError` for a malformed filter.
    """
    parsed = parse_log_filter(filter_spec)
    default = parsed.default or "info"
    levels: dict[str, int] = {"": _LEVELS[default]}
    if default != "trace":
        levels[WIRE_LOGGER] = OFF
    if default not in ("debug", "trace"):
        levels[PYKKA_LOGGER] = logging.WARNING
    for target, level in parsed.directives:
        for name in map_target(target):
            levels[name] = _LEVELS[level]
    return levels


def configure_logging(filter_spec: str, fmt: str, stream: TextIO | None = None) -> None:
    """Install one redacting handler on the root logger; safe to call again.

    ``fmt`` is ``human`` or ``json``; output goes to ``stream`` (default stdout, like the
    real gateway).
    """
    global _handler
    levels = logger_levels(filter_spec)
    if fmt not in ("human", "json"):
        from gateway.config import ConfigError

        raise ConfigError("log_format", f"expected human or json, got {fmt!r}")
    root = logging.getLogger()
    for name in _configured:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _configured.clear()
    if _handler is not None:
        root.removeHandler(_handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(HumanFormatter() if fmt == "human" else JsonFormatter())
    root.addHandler(handler)
    _handler = handler
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
        if name:
            _configured.append(name)
    logging.captureWarnings(True)
