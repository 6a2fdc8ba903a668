"""Domain patterns of DNS resources (gateway-messages.md §0.2, dataplane.md §8.1).

``*`` is exactly one label (a leading ``*.`` also matches the apex), ``**`` is zero or
more labels, ``?`` is exactly one character within a label; case-insensitive; names are
compared without a trailing dot.
"""

from __future__ import annotations

from functools import lru_cache


def _label_matches(pattern: str, label: str) -> bool:
    if pattern == "*":
        return True
    if len(pattern) != len(label):
        return False
    return all(p == "?" or p == c for p, c in zip(pattern, label, strict=True))


@lru_cache(maxsize=1024)
def _split(name: str) -> tuple[str, ...]:
    return tuple(name.lower().rstrip(".").split("."))


def matches(pattern: str, domain: str) -> bool:
    """Whether ``domain`` is matched by the resource address ``pattern``."""
    labels = _split(domain)
    parts = _split(pattern)
    if not domain or not pattern or "" in labels:
        return False
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
