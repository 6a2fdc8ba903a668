"""Firezone ID persistence (rust/gateway/src/main.rs, ``get_firezone_id``): a stable identity across
restarts.

The portal recognises a gateway by ``external_id`` = SHA-256 of this id, so it must survive
restarts and differ between the gateways of one site.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ID_FILE = "gateway_id"


class IdentityError(OSError):
    """The id could neither be read nor persisted; the gateway cannot start."""


def resolve_firezone_id(configured: str | None, state_dir: Path) -> str:
    """``configured`` if non-empty, else ``state_dir/gateway_id`` as is, else a new UUIDv4.

    Both are used exactly, untrimmed (rust/gateway/src/main.rs, ``get_firezone_id``): the id is
    hashed into ``external_id``, so a byte of difference would make the portal see another gateway.

    A new id is written (lowercase, hyphenated, no newline) atomically, creating the
    directory. Raises :class:`IdentityError` naming the directory when that fails.
    """
    if configured:
        return configured
    path = state_dir / ID_FILE
    try:
        # Bytes, not read_text(): universal newlines would turn "\r\n" into "\n" and so
        # change the id (and the portal's external_id) that the file holds.
        existing = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot read %s (%s); generating a new Firezone ID", path, exc)
        existing = ""
    if existing:
        return existing  # as is: the real gateway does not trim either
    new_id = str(uuid.uuid4())
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{ID_FILE}.", dir=state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(new_id)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise IdentityError(
            "Couldn't read FIREZONE_ID or write it to disk: Please provide it through the env "
            f"variable or provide rw access to {state_dir}/ ({exc.strerror or exc})"
        ) from exc
    log.info("generated a new Firezone ID and saved it to %s", path)
    return new_id
