"""Login URL prototype: path, parameter order and encoding, schemes, redaction, key gate."""

from __future__ import annotations

import hashlib
import random

import pytest

from gateway.errors import LocalProtocolError
from gateway.portal.login_url import LoginUrl, LoginUrlPrototype, form_urlencode
from gateway.portal.phoenix import PhoenixChannel

KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
KEY_ENCODED = "fiAjSBWDgQfD1CFJkTwOf4zg%2B1QhH0eTT%2BoLaVIMpH8%3D"
FZ_ID = "4ad1e1f1-1a1d-4d7a-9d3c-4b0b7d1f2c3e"
EXTERNAL_ID = hashlib.sha256(FZ_ID.encode()).hexdigest()


def test_exact_url_for_given_inputs() -> None:
    proto = LoginUrlPrototype.build("wss://api.firezone.dev", "SFMyNTY.g2gD", FZ_ID, "gw-eu-1")
    url = proto.with_public_key(KEY)
    assert url.url == (
        "wss://api.firezone.dev/gateway/websocket?token=SFMyNTY.g2gD"
        f"&external_id={EXTERNAL_ID}&name=gw-eu-1&public_key={KEY_ENCODED}"
    )
    assert url.public_key == KEY
    assert len(proto.external_id) == 64


def test_encoding_of_spaces_and_reserved_characters() -> None:
    proto = LoginUrlPrototype.build("https://h", "a+b/c=d e", "x", "my gw ü")
    query = proto.with_public_key(KEY).url.split("?", 1)[1]
    assert query.startswith("token=a%2Bb%2Fc%3Dd+e&")
    assert "&name=my+gw+%C3%BC&" in query
    assert query.endswith(f"public_key={KEY_ENCODED}")
    assert form_urlencode([("k", "*-._~")]) == "k=*-._%7E"


@pytest.mark.parametrize(
    ("api_url", "expected_base"),
    [
        ("http://localhost:8081", "ws://localhost:8081/gateway/websocket"),
        ("ws://api:8081/", "ws://api:8081/gateway/websocket"),
        ("https://api.example.com/portal/", "wss://api.example.com/portal/gateway/websocket"),
        (
            "wss://api.example.com/a/b?x=1&token=old#frag",
            "wss://api.example.com/a/b/gateway/websocket",
        ),
        ("HTTPS://[::1]:4443", "wss://[::1]:4443/gateway/websocket"),
    ],
)
def test_scheme_mapping_path_and_query_clearing(api_url: str, expected_base: str) -> None:
    url = LoginUrlPrototype.build(api_url, "t", "id", "n").with_public_key(KEY).url
    assert url.split("?", 1)[0] == expected_base
    assert url.count("?") == 1 and "x=1" not in url and "old" not in url


def test_host_and_bookkeeping_port() -> None:
    assert LoginUrlPrototype.build("ws://h", "t", "i", "n").port == 443
    proto = LoginUrlPrototype.build("wss://api.example.com:8443", "t", "i", "n")
    assert (proto.host, proto.port) == ("api.example.com", 8443)


@pytest.mark.parametrize("api_url", ["ftp://h", "file:///tmp/x", "h:80", "mailto:a@b"])
def test_bad_schemes_are_rejected_clearly(api_url: str) -> None:
    with pytest.raises(ValueError, match="only http\\(s\\) and ws\\(s\\) are allowed"):
        LoginUrlPrototype.build(api_url, "t", "i", "n")


@pytest.mark.parametrize("api_url", ["wss://", "http:///path", "ws://:80"])
def test_url_without_host_is_rejected(api_url: str) -> None:
    with pytest.raises(ValueError, match="no host"):
        LoginUrlPrototype.build(api_url, "t", "i", "n")


def test_token_never_shows_in_redacted_forms_or_repr() -> None:
    proto = LoginUrlPrototype.build("wss://h", "s3cr3t-token", "i", "n")
    url = proto.with_public_key(KEY)
    for text in (proto.redacted(), url.redacted(), repr(url), str(url), repr(proto)):
        assert "s3cr3t-token" not in text
    assert url.redacted().startswith("wss://h/gateway/websocket?token=<redacted>&external_id=")
    assert url.redacted().endswith(KEY_ENCODED)
    assert "public_key" not in proto.redacted()
    assert "s3cr3t-token" in url.url


@pytest.mark.parametrize(
    "bad_key",
    [
        "",
        KEY.rstrip("="),  # no padding
        KEY.replace("+", "-"),  # URL-safe alphabet
        "A" * 44,  # 44 chars, 33 bytes
        "A" * 42 + "B=",  # non-canonical trailing bits
        KEY + "AAAA",
    ],
)
def test_with_public_key_rejects_bad_keys(bad_key: str) -> None:
    with pytest.raises(ValueError, match="public_key"):
        LoginUrlPrototype.build("wss://h", "t", "i", "n").with_public_key(bad_key)


def test_login_url_cannot_be_made_without_the_prototype() -> None:
    with pytest.raises(TypeError, match="with_public_key"):
        LoginUrl(url="wss://h/gateway/websocket?token=t", public_key=KEY, _redacted="x")


def test_channel_rejects_a_prototype_where_a_key_is_missing() -> None:
    proto = LoginUrlPrototype.build("wss://h", "t", "i", "n")
    channel = PhoenixChannel(proto, random.Random(1), now=0.0)
    assert channel.poll_action() is None  # nothing happens without a key
    with pytest.raises(LocalProtocolError):
        channel.connect(proto, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        channel.connect("not-a-key", now=0.0)
    assert channel.state == "disconnected" and channel.poll_action() is None


@pytest.mark.parametrize(
    ("api_url", "host", "port", "host_header", "secure"),
    [
        ("wss://api.firezone.dev", "api.firezone.dev", 443, "api.firezone.dev", True),
        ("ws://h", "h", 80, "h", False),  # the TCP port is the scheme's, not the bookkeeping's 443
        ("http://127.0.0.1:8081", "127.0.0.1", 8081, "127.0.0.1", False),
        ("https://API.Example.com:8443/p/", "api.example.com", 8443, "api.example.com", True),
        ("wss://[::1]:4443", "::1", 4443, "[::1]", True),
        ("ws://[fd00::2]", "fd00::2", 80, "[fd00::2]", False),
    ],
)
def test_connect_target_and_host_header(
    api_url: str, host: str, port: int, host_header: str, secure: bool
) -> None:
    """Connect to the explicit port or the scheme default; Host has no port."""
    url = LoginUrlPrototype.build(api_url, "t", "i", "n").with_public_key(KEY)
    assert (url.host, url.port, url.host_header, url.secure) == (host, port, host_header, secure)


def test_userinfo_in_the_api_url_never_shows() -> None:
    """``wss://user:pass@host`` connects with the userinfo but logs ``<redacted>@``."""
    proto = LoginUrlPrototype.build("wss://admin:hunter2-pw@portal.test:8443/x", "tok", "i", "n")
    url = proto.with_public_key(KEY)
    for text in (proto.redacted(), url.redacted(), repr(url), str(url), repr(proto), str(proto)):
        assert "hunter2-pw" not in text and "admin" not in text, text
        assert "wss://<redacted>@portal.test:8443/x/gateway/websocket?" in text
    assert url.url.startswith("wss://admin:hunter2-pw@portal.test:8443/")
    assert proto.host == "portal.test"


def test_config_never_shows_the_api_urls_userinfo() -> None:
    from gateway.config import ConfigError, build_config

    def build(api_url: str) -> object:
        return build_config(
            file_values={"token": "tok-123456", "api_url": api_url}, env={}, flags={}
        )

    config = build("wss://u:hunter2-pw@h.test")
    assert "hunter2-pw" not in repr(config) and "wss://<redacted>@h.test" in repr(config)
    for bad in ("wss://u:hunter2-pw@", "wss://u:hunter2-pw@h.test:0"):
        with pytest.raises(ConfigError) as caught:
            build(bad)
        assert "hunter2-pw" not in str(caught.value)
