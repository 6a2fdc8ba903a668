"""Gateway configuration: schema, defaults, validation and the flag > env > file > default merge.

Pure: the caller (``actors/config_loader.py``) reads the YAML file, the environment and any
token file and passes their contents in, so every rule here is testable without a disk.

Environment variables (empty values count as unset, like the real gateway's ``FIREZONE_ID``;
``FIREZONE_ID`` and ``FIREZONE_NO_TELEMETRY`` are used exactly as given, as clap does, so
only ``""`` is unset there):

======================================  ==========================  =======================
variable                                key                         default
======================================  ==========================  =======================
``FIREZONE_TOKEN``                      token                       required
``FIREZONE_TOKEN_FILE``                 token_file                  —
``FIREZONE_API_URL``                    api_url                     wss://api.firezone.dev
``FIREZONE_ID``                         firezone_id                 persisted id
``FIREZONE_NAME``                       name                        hostname
``FIREZONE_NO_TELEMETRY`` (true/false)  telemetry (negated)         false (nothing is sent)
``HEALTH_CHECK_ADDR``                   health_check_addr           0.0.0.0:8080
``RUST_LOG``                            log_filter                  info
``FIREZONE_LOG_FORMAT``                 log_format                  human
``FIREZONE_CONTROL_SOCKET``             control_socket              /run/firezone-gateway/…
``FIREZONE_STATE_DIR``                  state_dir                   /var/lib/firezone
``FIREZONE_TUN_NAME``                   tun_name                    tun-firezone
``FIREZONE_ICMP_PROHIBITED``            icmp_prohibited             false
``FIREZONE_NO_CHECK``                   no_check                    false
``FIREZONE_SETUP_HOST``                 setup_host                  false
``FIREZONE_NETWORK_CHANGE_RESET``       network_change_reset        true
``FIREZONE_NETWORK_CHANGE_DEBOUNCE``    network_change_debounce     2.0 (seconds)
======================================  ==========================  =======================

The two ``NETWORK_CHANGE`` settings are ours (the 1.4 gateway never resets on its own):
reset when the gateway's own usable addresses change (``gateway/roaming.py``); also the
flags ``--no-network-change-reset`` and ``--network-change-debounce``.

Booleans from the environment must be exactly ``true`` or ``false`` (clap's parser in the
real gateway rejects ``1``). The token may also come from ``token_file`` (any layer) or a
systemd credential, which the loader passes as ``credential_token``.

``LOG_FORMAT`` is not read: the 1.4-era installer writes it (``google-cloud``) but the 1.4
binary ignores it (rust/gateway/src/main.rs); ``FIREZONE_LOG_FORMAT`` (1.4.18) is the variable.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.portal.login_url import redact_userinfo

#: Unix socket paths are limited by ``sun_path`` (108 bytes including the NUL).
MAX_UNIX_SOCKET_PATH = 107
#: Linux interface names: IFNAMSIZ - 1.
MAX_IFNAME = 15
DEFAULT_CONTROL_SOCKET = "/run/firezone-gateway/control.sock"
LOG_LEVELS = ("off", "error", "warn", "info", "debug", "trace")


class ConfigError(GatewayError, ValueError):
    """A configuration value is missing or malformed; ``str()`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.detail = message


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs to start; built only through :func:`build_config`."""

    token: str  # secret: never shown by repr
    api_url: str = "wss://api.firezone.dev"
    firezone_id: str | None = None  # None -> persisted id (actors/identity.py)
    name: str | None = None  # None -> hostname
    log_filter: str = "info"
    log_format: str = "human"
    health_check_addr: tuple[str, int] = ("0.0.0.0", 8080)
    control_socket: str = DEFAULT_CONTROL_SOCKET
    state_dir: str = "/var/lib/firezone"
    tun_name: str = "tun-firezone"
    icmp_prohibited: bool = False
    no_check: bool = False
    setup_host: bool = False
    network_change_reset: bool = True
    network_change_debounce: float = 2.0
    telemetry: bool = False  # accepted for compatibility; nothing is ever sent

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            if name == "token":
                return "<redacted>"
            if name == "api_url":
                return repr(redact_userinfo(self.api_url))
            return repr(getattr(self, name))

        parts = [f"{f.name}={shown(f.name)}" for f in fields(self)]
        return f"GatewayConfig({', '.join(parts)})"


# --- log filter (shared with actors/logsetup.py) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class LogFilter:
    """A parsed ``RUST_LOG``-style filter: a default level plus per-target levels."""

    default: str | None  # one of LOG_LEVELS; None when the spec names no bare level
    directives: tuple[tuple[str, str], ...]  # (target as written, level)
    #: Span/field directives, (as written, the ``TARGET=LEVEL`` applied instead or None when
    #: nothing was): we have no spans, so only their target and level can apply.
    span_directives: tuple[tuple[str, str | None], ...] = ()


_TARGET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$")
#: ``target[span{field=value}]=level``: EnvFilter's span part, brackets not nested.
_SPAN_RE = re.compile(r"^(?P<target>[^\[\]=]*)\[[^\[\]]*\]\s*(?P<level>=[^\[\]]*)?$")
_LEVEL_ALIASES = {"warning": "warn", "critical": "error", "none": "off"}


def _parse_level(text: str) -> str | None:
    level = text.strip().lower()
    level = _LEVEL_ALIASES.get(level, level)
    return level if level in LOG_LEVELS else None


def parse_log_filter(spec: str) -> LogFilter:
    """Parse ``info,gateway.wg=debug,wire::api=trace`` (tracing's EnvFilter syntax).

    A bare level sets the default; a bare target enables everything for it (``trace``), as
    in tracing's EnvFilter. A span/field directive (``snownet[connection]=debug``, valid
    for the Rust gateway) applies as its target and level; one without a target applies
    nothing. Both are listed in ``span_directives`` so the caller can warn.
    """
    default: str | None = None
    directives: list[tuple[str, str]] = []
    spans: list[tuple[str, str | None]] = []

    def bad(part: str) -> ConfigError:
        return ConfigError(
            "log_filter", f"expected LEVEL or TARGET=LEVEL, got {part!r} in {spec!r}"
        )

    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        if "[" in part or "]" in part:
            match = _SPAN_RE.match(part)
            if match is None:
                raise bad(part)
            target = match["target"].strip()
            level = _parse_level(match["level"][1:]) if match["level"] else "trace"
            if level is None or (target and not _TARGET_RE.match(target)):
                raise bad(part)
            if target:
                directives.append((target, level))
            spans.append((part, f"{target}={level}" if target else None))
            continue
        target, sep, level_text = part.partition("=")
        target = target.strip()
        if sep:
            level = _parse_level(level_text)
            if level is None or not _TARGET_RE.match(target):
                raise bad(part)
            directives.append((target, level))
        elif (level := _parse_level(target)) is not None:
            default = level
        elif _TARGET_RE.match(target):
            directives.append((target, "trace"))
        else:
            raise bad(part)
    return LogFilter(default=default, directives=tuple(directives), span_directives=tuple(spans))


def span_directive_warnings(spec: str) -> list[str]:
    """One warning per span/field directive of ``spec``, saying what applies instead."""
    warnings = []
    for written, applied in parse_log_filter(spec).span_directives:
        if applied is None:
            warnings.append(
                f"log filter directive {written!r} ignored: span and field filters are not "
                "supported and it names no target"
            )
        else:
            warnings.append(
                f"log filter directive {written!r}: span and field filters are not "
                f"supported; applying {applied!r} instead"
            )
    return warnings


# --- value coercion -------------------------------------------------------------------------


def _expect_str(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return str(value)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _token(key: str, value: Any) -> str:
    token = _expect_str(key, value).strip()
    if not token:
        raise ConfigError(key, "is empty")
    if any(ch.isspace() for ch in token):
        # Do not echo the value: it is a secret.
        raise ConfigError(key, "must not contain whitespace")
    return token


def _api_url(key: str, value: Any) -> str:
    url = _expect_str(key, value).strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(
            key, f"expected a ws, wss, http or https URL, got {redact_userinfo(url)!r}"
        ) from None
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise ConfigError(
            key, f"expected scheme ws, wss, http or https, got {parts.scheme or 'none'!r}"
        )
    if not parts.hostname:
        raise ConfigError(key, f"expected a URL with a host, got {redact_userinfo(url)!r}")
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if not port_ok:
        raise ConfigError(
            key, f"expected a port between 1 and 65535, got {redact_userinfo(url)!r}"
        )
    return url


def _optional_str(key: str, value: Any) -> str | None:
    text = _expect_str(key, value).strip()
    return text or None


def _firezone_id(key: str, value: Any) -> str | None:
    """As given, untrimmed: it is hashed into ``external_id``, and any change of it makes
    the portal see a new gateway (rust/gateway/src/main.rs). Only ``""`` means unset."""
    text = _expect_str(key, value)
    return text or None


def _log_filter(key: str, value: Any) -> str:
    spec = _expect_str(key, value).strip()
    parse_log_filter(spec)
    return spec


def _log_format(key: str, value: Any) -> str:
    fmt = _expect_str(key, value).strip().lower()
    if fmt not in ("human", "json"):
        raise ConfigError(key, f"expected human or json, got {value!r}")
    return fmt


def _socket_addr(key: str, value: Any) -> tuple[str, int]:
    """``HOST:PORT`` with an IP literal host (IPv6 in brackets), or a ``[host, port]`` pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        host_text, port_text = str(value[0]), str(value[1])
    else:
        text = _expect_str(key, value).strip()
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
        if not match:
            raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
        host_text = match.group(1) or match.group(3)
        port_text = match.group(2) or match.group(4)
    try:
        host = str(ipaddress.ip_address(host_text.strip("[]")))
    except ValueError:
        raise ConfigError(key, f"expected HOST:PORT with an IP address, got {value!r}") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(key, f"expected a port between 0 and 65535, got {port_text!r}")
    return host, int(port_text)


def _abs_path(key: str, value: Any) -> str:
    path = _expect_str(key, value).strip()
    if not path.startswith("/"):
        raise ConfigError(key, f"expected an absolute path, got {path!r}")
    return path


def _socket_path(key: str, value: Any) -> str:
    path = _abs_path(key, value)
    if len(path.encode()) > MAX_UNIX_SOCKET_PATH:
        raise ConfigError(key, f"path longer than {MAX_UNIX_SOCKET_PATH} bytes: {path!r}")
    return path


def _ifname(key: str, value: Any) -> str:
    name = _expect_str(key, value).strip()
    if not 0 < len(name.encode()) <= MAX_IFNAME or "/" in name or any(c.isspace() for c in name):
        raise ConfigError(
            key, f"expected an interface name of 1-{MAX_IFNAME} characters, got {name!r}"
        )
    return name


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected seconds as a number, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected seconds as a number, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= 3600:
        raise ConfigError(key, f"expected seconds between 0 and 3600, got {value!r}")
    return seconds


_COERCE: dict[str, Callable[[str, Any], Any]] = {
    "token": _token,
    "api_url": _api_url,
    "firezone_id": _firezone_id,
    "name": _optional_str,
    "log_filter": _log_filter,
    "log_format": _log_format,
    "health_check_addr": _socket_addr,
    "control_socket": _socket_path,
    "state_dir": _abs_path,
    "tun_name": _ifname,
    "icmp_prohibited": _bool,
    "no_check": _bool,
    "setup_host": _bool,
    "network_change_reset": _bool,
    "network_change_debounce": _seconds,
    "telemetry": _bool,
}
#: Keys accepted in the YAML file: every config field plus ``token_file``.
FILE_KEYS = frozenset(_COERCE) | {"token_file"}

#: env var -> config key; first listed wins when several name the same key.
ENV_VARS: dict[str, str] = {
    "FIREZONE_TOKEN": "token",
    "FIREZONE_TOKEN_FILE": "token_file",
    "FIREZONE_API_URL": "api_url",
    "FIREZONE_ID": "firezone_id",
    "FIREZONE_NAME": "name",
    "FIREZONE_NO_TELEMETRY": "telemetry",
    "HEALTH_CHECK_ADDR": "health_check_addr",
    "RUST_LOG": "log_filter",
    "FIREZONE_LOG_FORMAT": "log_format",
    "FIREZONE_CONTROL_SOCKET": "control_socket",
    "FIREZONE_STATE_DIR": "state_dir",
    "FIREZONE_TUN_NAME": "tun_name",
    "FIREZONE_ICMP_PROHIBITED": "icmp_prohibited",
    "FIREZONE_NO_CHECK": "no_check",
    "FIREZONE_SETUP_HOST": "setup_host",
    "FIREZONE_NETWORK_CHANGE_RESET": "network_change_reset",
    "FIREZONE_NETWORK_CHANGE_DEBOUNCE": "network_change_debounce",
}


#: Variables the reference parses with clap and uses exactly as given (rust/gateway/src/main.rs):
#: no trimming, and only an empty value is unset (a blank one is a value: an odd id, or a
#: boolean clap rejects).
EXACT_ENV_VARS = frozenset({"FIREZONE_ID", "FIREZONE_NO_TELEMETRY"})


def _env_is_set(var: str, raw: str | None) -> bool:
    if raw is None:
        return False
    return raw != "" if var in EXACT_ENV_VARS else raw.strip() != ""


def env_to_values(env: Mapping[str, str]) -> dict[str, Any]:
    """Map the real gateway's variables (and our ``FIREZONE_*`` extras) to config keys.

    Empty values are unset (blank ones too, except :data:`EXACT_ENV_VARS`).
    ``FIREZONE_NO_TELEMETRY`` is negated into ``telemetry`` and must be exactly ``true`` or
    ``false``. Other values stay strings; :func:`build_config` validates them.
    """
    values: dict[str, Any] = {}
    for var, key in ENV_VARS.items():
        raw = env.get(var)
        if raw is None or not _env_is_set(var, raw) or key in values:
            continue
        if var == "FIREZONE_NO_TELEMETRY":
            if raw not in ("true", "false"):
                raise ConfigError(key, f"expected true or false, got {raw!r} (from {var})")
            values[key] = raw == "false"
        else:
            values[key] = raw
    return values


def _env_source(env: Mapping[str, str], key: str) -> str:
    for var, k in ENV_VARS.items():
        if k == key and _env_is_set(var, env.get(var)):
            return var
    return "environment"


def _resolve_token(
    layers: list[tuple[str, Mapping[str, Any]]],
    read_token_file: Callable[[str], str] | None,
    credential_token: str | None,
) -> str:
    """The first layer (by precedence) naming ``token`` or ``token_file`` decides."""
    for source, values in layers:
        has_token = values.get("token") is not None
        token_file = values.get("token_file")
        if has_token and token_file is not None:
            raise ConfigError("token", f"give either token or token_file, not both ({source})")
        if has_token:
            try:
                return _token("token", values["token"])
            except ConfigError as exc:
                raise ConfigError("token", f"{exc.detail} (from {source})") from None
        if token_file is not None:
            path = _expect_str("token_file", token_file)
            if read_token_file is None:
                raise ConfigError("token_file", f"cannot read {path!r} here")
            try:
                content = read_token_file(path)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError("token_file", f"cannot read {path!r}: {reason}") from None
            try:
                return _token("token_file", content)
            except ConfigError as exc:
                raise ConfigError("token_file", f"{path!r} {exc.detail} (from {source})") from None
    if credential_token is not None and credential_token.strip():
        try:
            return _token("token", credential_token)
        except ConfigError as exc:
            raise ConfigError("token", f"{exc.detail} (from the systemd credential)") from None
    raise ConfigError(
        "token",
        "missing; pass TOKEN, set FIREZONE_TOKEN or FIREZONE_TOKEN_FILE, "
        "or put token_file in the config file",
    )


def build_config(
    *,
    file_values: Mapping[str, Any],
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    read_token_file: Callable[[str], str] | None = None,
    credential_token: str | None = None,
) -> GatewayConfig:
    """Merge flag > env > file > default and validate every value.

    ``flags`` values of ``None`` mean "not given". ``read_token_file`` reads a token file
    (the loader passes its IO function); ``credential_token`` is the systemd credential's
    content, used only when no layer names a token.
    """
    unknown = sorted(set(file_values) - FILE_KEYS)
    if unknown:
        raise ConfigError(
            unknown[0], f"unknown key in the config file (known: {', '.join(sorted(FILE_KEYS))})"
        )
    env_values = env_to_values(env)
    given_flags = {k: v for k, v in flags.items() if v is not None}
    unknown_flags = sorted(set(given_flags) - FILE_KEYS)
    if unknown_flags:
        raise ConfigError(unknown_flags[0], "unknown flag key")
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("command line", given_flags),
        ("environment", env_values),
        ("config file", file_values),
    ]
    chosen: dict[str, Any] = {"token": _resolve_token(layers, read_token_file, credential_token)}
    for key, coerce in _COERCE.items():
        if key == "token":
            continue
        for source, values in layers:
            if key in values and values[key] is not None:
                label = _env_source(env, key) if source == "environment" else source
                try:
                    chosen[key] = coerce(key, values[key])
                except ConfigError as exc:
                    raise ConfigError(key, f"{exc.detail} (from {label})") from None
                break
    return GatewayConfig(**chosen)
