"""Leak check: no secret, in any of the encodings a log line could carry it, in ``text``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import quote

#: Shorter strings would match by accident; the gateway's secrets are all far longer.
MIN_LENGTH = 6


def _encodings(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), json.dumps(secret)[1:-1], repr(secret)[1:-1]}


def assert_no_secrets(text: str, secrets: Iterable[str]) -> None:
    """Fail naming the leaked secret's position (never the secret itself)."""
    for index, secret in enumerate(s for s in secrets if len(s) >= MIN_LENGTH):
        for form in _encodings(secret):
            where = text.find(form)
            if where != -1:
                line = text.count("\n", 0, where) + 1
                context = text[max(0, where - 40) : where].replace("\n", " ")
                raise AssertionError(
                    f"secret #{index} ({len(secret)} chars) leaked on line {line} after {context!r}"
                )
