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
    ],
)
def test_matches(pattern: str, domain: str, expected: bool) -> None:
    assert matches(pattern, domain) is expected
