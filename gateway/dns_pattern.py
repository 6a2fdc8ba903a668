"""Domain patterns of DNS resources (rust/connlib/tunnel/src/dns.rs).

A glob over labels, as 1.4 matches them (the ``glob`` crate on the name with dots read as
path separators, rust/connlib/tunnel/src/dns.rs): ``**`` is zero or more whole labels;
within a label ``*`` is any run of characters, ``?`` one character and ``[...]`` a
character class, none of them crossing a dot; a leading ``*.`` also matches the apex;
case-insensitive; names are compared without a trailing dot. A ``**`` that is not a whole
label makes the pattern invalid (the glob crate refuses it), and it matches nothing.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import lru_cache


def _label_matches(pattern: str, label: str) -> bool:
    return pattern == "*" or fnmatchcase(label, pattern)


@lru_cache(maxsize=1024)
def _split(name: str) -> tuple[str, ...]:
    return tuple(name.lower().rstrip(".").split("."))


def matches(pattern: str, domain: str) -> bool:
    """Whether ``domain`` is matched by the resource address ``pattern``."""
    labels = _split(domain)
    parts = _split(pattern)
    if not domain or not pattern or "" in labels:
        return False
    if any("**" in part and part != "**" for part in parts):
        return False  # not a valid glob
    if parts[0] == "*" and parts[1:] == labels:
        return True  # "*.example.com" also matches "example.com"
    return _match(parts, labels)


def _match(parts: tuple[str, ...], labels: tuple[str, ...]) -> bool:
    # reachable[j]: parts[:i] can match labels[:j]; classic glob DP over labels.
    reachable = [True] + [False] * len(labels)
    for part in parts:
        if part == "**":
            for j in range(1, len(labels) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
            continue
        nxt = [False] * (len(labels) + 1)
        for j in range(1, len(labels) + 1):
            nxt[j] = reachable[j - 1] and _label_matches(part, labels[j - 1])
        reachable = nxt
    return reachable[len(labels)]
