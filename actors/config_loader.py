"""Reads the configuration's sources (YAML file, environment, token files, systemd credential).

All rules live in :mod:`gateway.config`; this module only does the IO around it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.config import ConfigError, GatewayConfig, build_config, span_directive_warnings

log = logging.getLogger(__name__)
DEFAULT_CONFIG_PATH = "/etc/firezone/gateway.yaml"
#: systemd's ``LoadCredential=FIREZONE_TOKEN:…`` puts the token here.
CREDENTIAL_NAME = "FIREZONE_TOKEN"


def read_config_file(path: str, *, required: bool) -> dict[str, Any]:
    """The YAML mapping in ``path``; ``{}`` for an empty file or a missing optional one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError("config", f"file not found: {path!r}") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError("config", f"cannot read {path!r}: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("config", f"{path!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError("config", f"{path!r} must contain a mapping of keys to values")
    return data


def read_token_file(path: str) -> str:
    """A token file's content (the caller trims it)."""
    return Path(path).read_text(encoding="utf-8")


def read_credential(env: Mapping[str, str]) -> str | None:
    """``$CREDENTIALS_DIRECTORY/FIREZONE_TOKEN`` if systemd passed one."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        return read_token_file(os.path.join(directory, CREDENTIAL_NAME))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("token", f"cannot read the systemd credential: {exc.strerror}") from None


def _token_path_as_file(env: Mapping[str, str]) -> dict[str, str]:
    """Like the container entrypoint: ``FIREZONE_TOKEN`` naming an existing file is a path."""
    value = env.get("FIREZONE_TOKEN", "")
    if value.strip() and os.path.isfile(value):
        rewritten = {k: v for k, v in env.items() if k != "FIREZONE_TOKEN"}
        rewritten.setdefault("FIREZONE_TOKEN_FILE", value)
        return rewritten
    return dict(env)


def load_config(
    *,
    config_path: str | None,
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Build the configuration; ``config_path=None`` means the optional default file.

    Raises :class:`ConfigError` (one line naming the key) for anything wrong.
    """
    environ = dict(os.environ if env is None else env)
    explicit = config_path if config_path is not None else environ.get("FIREZONE_CONFIG")
    file_values = read_config_file(explicit or DEFAULT_CONFIG_PATH, required=bool(explicit))
    config = build_config(
        file_values=file_values,
        env=_token_path_as_file(environ),
        flags=flags,
        read_token_file=read_token_file,
        credential_token=read_credential(environ),
    )
    # Before logging is configured (start-up) this reaches stderr through logging's
    # last-resort handler; on SIGHUP it goes to the gateway's log.
    for warning in span_directive_warnings(config.log_filter):
        log.warning("%s", warning)
    return config
