"""The portal login URL (rust/phoenix-channel/src/login_url.rs).

The URL is built in two steps on purpose. :class:`LoginUrlPrototype` holds what is known
at startup (API URL, token, ``external_id``, ``name``); it becomes a connectable
:class:`LoginUrl` only through :meth:`LoginUrlPrototype.with_public_key`. The portal
derives every flow's ICE credentials from the gateway's public key, so connecting without
the *current* key would be a bug; code that opens sockets accepts only ``LoginUrl``.

The token is a secret: ``LoginUrl.url`` must never be logged; use ``redacted()``. So is
any ``user:password@`` in the API URL: ``redacted()`` and the ``repr`` of both classes
replace it with ``<redacted>@`` (:func:`redact_userinfo`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import SplitResult, urlsplit, urlunsplit

from gateway.portal.keys import parse_key

_SCHEMES: Final = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}
_DEFAULT_BOOKKEEPING_PORT: Final = 443  # 443 even for ws:// without explicit port
_DEFAULT_PORTS: Final = {"ws": 80, "wss": 443}  # the port actually connected to
_FORM_SAFE: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789*-._")
REDACTED: Final = "<redacted>"

#: ``scheme://`` then the userinfo: up to the last ``@`` before the path, query or fragment.
_USERINFO: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")

#: Only the prototype holds this; it is what makes ``LoginUrl(...)`` unconstructible elsewhere.
_PROTOTYPE_ONLY: Final = object()


def form_urlencode(pairs: Iterable[tuple[str, str]]) -> str:
    """``application/x-www-form-urlencoded`` exactly like the Rust ``url`` crate.

    Unreserved bytes are ``A-Z a-z 0-9 * - . _``; space becomes ``+``; everything else is
    ``%XX`` (upper case), so a base64 key's ``+ / =`` become ``%2B %2F %3D``.
    """

    def encode(text: str) -> str:
        out = []
        for byte in text.encode("utf-8"):
            if byte in _FORM_SAFE:
                out.append(chr(byte))
            elif byte == 0x20:
                out.append("+")
            else:
                out.append(f"%{byte:02X}")
        return "".join(out)

    return "&".join(f"{encode(k)}={encode(v)}" for k, v in pairs)


def redact_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``<redacted>@``, for logs."""
    return _USERINFO.sub(rf"\1{REDACTED}@", url)


def external_id_for(firezone_id: str) -> str:
    """1.4.x always hashes: lowercase hex SHA-256 of the UTF-8 Firezone ID."""
    return hashlib.sha256(firezone_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class LoginUrl:
    """A connectable portal URL, including ``public_key``. Only the prototype makes these.

    ``url`` contains the token: never log it. ``repr`` and ``str`` are redacted.
    """

    url: str = field(repr=False)
    public_key: str
    _redacted: str = field(repr=False)
    _origin: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._origin is not _PROTOTYPE_ONLY:
            raise TypeError("LoginUrl is built by LoginUrlPrototype.with_public_key(key)")

    def redacted(self) -> str:
        return self._redacted

    @property
    def host(self) -> str:
        """The host to resolve and connect to (IPv6 literals without brackets)."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The TCP port: the URL's explicit port or the scheme default (80/443)."""
        parts = urlsplit(self.url)
        return parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]

    @property
    def secure(self) -> bool:
        """``wss``: the connection needs TLS (SNI and certificate checks on :attr:`host`)."""
        return urlsplit(self.url).scheme == "wss"

    @property
    def host_header(self) -> str:
        """The upgrade request's ``Host``: the host name only, never a port."""
        host = self.host
        return f"[{host}]" if ":" in host else host

    def __repr__(self) -> str:
        return f"LoginUrl({self._redacted!r})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class LoginUrlPrototype:
    """Base URL and the startup parameters; add the public key to get a :class:`LoginUrl`."""

    base: str  # scheme://netloc/path with no query; not secret
    token: str = field(repr=False)
    external_id: str
    name: str
    #: rust/phoenix-channel/src/login_url.rs's bookkeeping, what the start-up resolution uses: the
    #: host, and the explicit port or 443 (even for ``ws://``). Connections use
    #: :attr:`LoginUrl.port`.
    host: str
    port: int

    @classmethod
    def build(cls, api_url: str, token: str, firezone_id: str, name: str) -> LoginUrlPrototype:
        """Validate and normalise ``api_url``; raise ``ValueError`` with a clear message."""
        try:
            parts = urlsplit(api_url)
            explicit_port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid API URL: {exc}") from None
        scheme = _SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(
                f"invalid scheme {parts.scheme!r} in API URL; only http(s) and ws(s) are allowed"
            )
        if not parts.hostname:
            raise ValueError("invalid API URL: it has no host")
        if not token:
            raise ValueError("the token must not be empty")
        segments = parts.path.split("/")[1:] if parts.path else []
        if segments and segments[-1] == "":
            segments.pop()
        path = "/" + "/".join([*segments, "gateway", "websocket"])
        base = urlunsplit(SplitResult(scheme, parts.netloc, path, "", ""))
        return cls(
            base=base,
            token=token,
            external_id=external_id_for(firezone_id),
            name=name,
            host=parts.hostname,
            port=explicit_port if explicit_port is not None else _DEFAULT_BOOKKEEPING_PORT,
        )

    def _url(self, public_key: str | None, *, redact: bool) -> str:
        pairs = [("external_id", self.external_id), ("name", self.name)]
        if public_key is not None:
            pairs.append(("public_key", public_key))
        token = f"token={REDACTED}" if redact else form_urlencode([("token", self.token)])
        base = redact_userinfo(self.base) if redact else self.base
        return f"{base}?{token}&{form_urlencode(pairs)}"

    def with_public_key(self, public_key_b64: str) -> LoginUrl:
        """The connectable URL for this key (44-char standard base64 of 32 bytes)."""
        key = parse_key(public_key_b64, "public_key")
        return LoginUrl(
            url=self._url(key, redact=False),
            public_key=key,
            _redacted=self._url(key, redact=True),
            _origin=_PROTOTYPE_ONLY,
        )

    def redacted(self) -> str:
        """For logs: the URL without public key, token and userinfo ``<redacted>``."""
        return self._url(None, redact=True)

    def __repr__(self) -> str:
        return f"LoginUrlPrototype({self.redacted()!r})"

    __str__ = __repr__
