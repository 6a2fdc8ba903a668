"""RUST_LOG span/field directives reach the loggers as their target's level."""

from __future__ import annotations

import logging

from actors.logsetup import logger_levels, map_target


def test_span_directive_sets_its_targets_loggers() -> None:
    plain = logger_levels("info,snownet=debug")
    spanned = logger_levels("info,snownet[connection{cid=1}]=debug")
    assert spanned == plain
    for name in map_target("snownet"):
        assert spanned[name] == logging.DEBUG


def test_targetless_span_directive_changes_nothing() -> None:
    assert logger_levels("warn,[connection]=trace") == logger_levels("warn")
