"""Shared settings and mutation strategies of the fuzz suite (tests/fuzz).

Every fuzz test is seeded (``derandomize=True``: the same examples on every run, so a
failure is reproducible from the example hypothesis prints) and short by default: the whole
directory runs in well under a minute on two cores. ``FZ_FUZZ_LONG=1`` multiplies the
examples by 100 for a long run (still derandomized; ``FZ_FUZZ_SEED=<n>`` switches to a
random run from that seed instead, to explore further).

Seeds are real messages: the portal fixtures (``tests/fixtures/portal``) and datagrams the
simulated client, relay and gateway exchange. Mutations replace one value of a JSON tree
with something hostile, or edit bytes and characters.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

from gateway.errors import RemoteProtocolError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "portal"
LONG = os.environ.get("FZ_FUZZ_LONG") == "1"
_SEED = os.environ.get("FZ_FUZZ_SEED")

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(examples: int) -> Callable[[F], F]:
    """``examples`` by default, 100 times as many with ``FZ_FUZZ_LONG=1``; seeded."""

    def wrap(test: F) -> F:
        configured = settings(
            max_examples=examples * (100 if LONG else 1),
            deadline=None,
            derandomize=_SEED is None,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )(test)
        if _SEED is not None:
            configured = seed(int(_SEED))(configured)
        return configured

    return wrap


def only_gateway_errors(call: Callable[[], object]) -> None:
    """Run ``call``; a ``RemoteProtocolError`` is an accepted refusal, anything else fails.

    A ``LocalProtocolError`` (``InvalidArgument`` included: a builder given what it cannot
    encode) on hostile input means the code misused its own API, so it fails too."""
    with contextlib.suppress(RemoteProtocolError):
        call()


def fixtures() -> dict[str, Any]:
    """Every portal fixture by name: frames, and resources and filters on their own."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(FIXTURES.glob("*.json"))}


# --- hostile values --------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "\ud800", "a\udfffb", "\x00", "\u202e", "\U0001f600" * 300, "x" * 70_000,
    "é" * 200, "::", "[::1]:0", "1.2.3.4:99999", "1.2.3.4:²", "fe80::1%eth0", "0.0.0.0:1",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "١٢٣", "-1", "NaN", "null",
    "candidate:1 1 udp 1 1.2.3.4 1 typ host", "*", "**", "[", "?", "*.**.a",
]
HOSTILE_NUMBERS: list[Any] = [
    0, -1, 1.5, 2**31, 2**64, 10**30, 10**400, -(10**400), float("nan"), float("inf"),
    float("-inf"), 1e308, -0.0, True, False,
]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_NUMBERS),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=12,
)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(tree, dict):
        for key, child in tree.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            out += _paths(child, (*prefix, i))
    return out


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        copy = dict(tree)
        copy[head] = _replace(tree[head], rest, value)
        return copy
    copy_list = list(tree)
    copy_list[head] = _replace(tree[head], rest, value)
    return copy_list


def _delete(tree: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return tree
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict):
        return _replace(tree, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
    return _replace(tree, path[:-1], [v for i, v in enumerate(parent) if i != path[-1]])


@st.composite
def mutated_json(draw: st.DrawFn, tree: Any, rounds: int = 3) -> Any:
    """``tree`` with up to ``rounds`` values replaced by hostile ones or deleted."""
    for _ in range(draw(st.integers(min_value=0, max_value=rounds))):
        path = draw(st.sampled_from(_paths(tree)))
        if path and draw(st.integers(0, 4)) == 0:
            tree = _delete(tree, path)
        else:
            tree = _replace(tree, path, draw(json_value))
    return tree


@st.composite
def mutated_bytes(draw: st.DrawFn, seed_data: bytes) -> bytes:
    """Bit flips, overwrites, insertions, deletions, truncation and extension."""
    data = bytearray(seed_data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3 and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == 4:
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


@st.composite
def mutated_text(draw: st.DrawFn, seed_text: str) -> str:
    """Character edits of JSON text, including escapes JSON allows but UTF-8 does not."""
    text = seed_text
    snippets = st.sampled_from(
        ['\\ud800', '\\udfff', "NaN", "Infinity", "-Infinity", "1e999", "9" * 4400,
         "[" * 40, "]", "{", "}", '"', ",", ":", "\\", "\x00", "null", "-"]
    )
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 2))
        if op == 0:
            text = text[:pos] + draw(snippets) + text[pos:]
        elif op == 1:
            text = text[:pos] + text[pos + draw(st.integers(1, 6)) :]
        else:
            text = text[:pos] + draw(st.text(max_size=4)) + text[pos:]
    return text
