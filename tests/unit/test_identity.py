"""Firezone ID: configured, persisted, or generated and saved."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from actors.identity import IdentityError, resolve_firezone_id


def test_configured_id_wins_and_nothing_is_written(tmp_path: Path) -> None:
    assert resolve_firezone_id("my-id", tmp_path / "state") == "my-id"
    assert not (tmp_path / "state").exists()


def test_new_id_is_generated_persisted_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    first = resolve_firezone_id(None, state)
    assert str(uuid.UUID(first)) == first  # lowercase hyphenated
    assert uuid.UUID(first).version == 4
    assert (state / "gateway_id").read_bytes() == first.encode()  # no newline
    assert resolve_firezone_id(None, state) == first
    assert resolve_firezone_id("", state) == first  # empty configured = unset
    assert [p.name for p in state.iterdir()] == ["gateway_id"]  # no temp file left


def test_existing_file_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "gateway_id").write_text("custom-id\n")
    assert resolve_firezone_id(None, tmp_path) == "custom-id\n"


@pytest.mark.parametrize(
    "content",
    [b"custom-id\r\n", b"custom-id\r", b"\tcustom id \n\n", b"  ", "caf\u00e9-id".encode()],
)
def test_existing_file_bytes_used_exactly(tmp_path: Path, content: bytes) -> None:
    """No newline translation and no trimming: the id is the file's bytes (UTF-8)."""
    (tmp_path / "gateway_id").write_bytes(content)
    assert resolve_firezone_id(None, tmp_path) == content.decode("utf-8")
    assert (tmp_path / "gateway_id").read_bytes() == content  # left alone


@pytest.mark.parametrize("configured", [" id ", "id\n", "id\r\n", " ", "\t"])
def test_configured_id_used_exactly(tmp_path: Path, configured: str) -> None:
    assert resolve_firezone_id(configured, tmp_path) == configured
    assert not (tmp_path / "gateway_id").exists()


def test_empty_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "gateway_id").write_text("")
    new = resolve_firezone_id(None, tmp_path)
    assert uuid.UUID(new)
    assert (tmp_path / "gateway_id").read_text() == new


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(IdentityError) as info:
        resolve_firezone_id(None, blocker / "state")
    message = str(info.value)
    assert f"{blocker / 'state'}/" in message
    assert "FIREZONE_ID" in message
