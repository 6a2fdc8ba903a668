"""DNS-resource address patterns (gateway/dns_pattern.py)."""

from __future__ import annotations

import pytest

from gateway.dns_pattern import matches


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "EXAMPLE.com", True),
        ("Example.COM", "example.com", True),
        ("example.com", "www.example.com", False),
        ("example.com", "example.com.", True),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "example.com", True),  # leading *. matches the apex
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "example.org", False),
        ("a.*.example.com", "a.b.example.com", True),
        ("a.*.example.com", "a.example.com", False),
        ("**.example.com", "example.com", True),
        ("**.example.com", "a.example.com", True),
        ("**.example.com", "a.b.c.example.com", True),
        ("**.example.com", "example.org", False),
        ("a.**.example.com", "a.example.com", True),
        ("a.**.example.com", "a.x.y.example.com", True),
        ("?.httpbin", "a.httpbin", True),
        ("?.httpbin", "ab.httpbin", False),
        ("?.httpbin", "httpbin", False),
        ("h?tpbin", "HTTPBIN", True),
        ("*.httpbin", "download.httpbin", True),
        ("example.com", "", False),
        ("example.com", "example..com", False),
        # Globs within a label, as the glob crate in 1.4 matches them.
        ("foo*.corp.test", "foobar.corp.test", True),
        ("foo*.corp.test", "foo.corp.test", True),
        ("foo*.corp.test", "bar.corp.test", False),
        ("*ample.com", "example.com", True),
        ("app.*com", "app.foo.com", False),  # * never crosses a dot
        ("app?com", "app.com", False),  # nor does ?
        ("app.f??.example.com", "app.foo.example.com", True),
        ("ap[pq].example.com", "apq.example.com", True),
        ("ap[!p].example.com", "app.example.com", False),
        ("foo**.example.com", "foobar.example.com", False),  # not a valid glob
    ],
)
def test_matches(pattern: str, domain: str, expected: bool) -> None:
    assert matches(pattern, domain) is expected


# The reference's own cases (rust/connlib/tunnel/src/dns.rs @ e9b2e4735a).
@pytest.mark.parametrize(
    ("pattern", "domain"),
    [
        ("**.example.com", "example.com"),
        ("app.**.example.com", "app.bar.foo.example.com"),
        ("**.example.com", "foo.example.com"),
        ("**.example.com", "foo.bar.example.com"),
        ("*.example.com", "foo.example.com"),
        ("*.example.com", "example.com"),
        ("foo.*.example.com", "foo.bar.example.com"),
        ("app.*.*.example.com", "app.foo.bar.example.com"),
        ("app.f??.example.com", "app.foo.example.com"),
        ("app.example.com", "app.example.com"),
        ("*?*.example.com", "app.example.com"),
        ("app.**.web.**.example.com", "app.web.example.com"),
    ],
)
def test_the_reference_matches(pattern: str, domain: str) -> None:
    assert matches(pattern, domain)


@pytest.mark.parametrize(
    ("pattern", "domain"),
    [
        ("app.*.example.com", "app.foo.bar.example.com"),
        ("app.*com", "app.foo.com"),
        ("app?com", "app.com"),
    ],
)
def test_the_reference_does_not_match(pattern: str, domain: str) -> None:
    assert not matches(pattern, domain)
