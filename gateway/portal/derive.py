"""Portal-side derivations (elixir/apps/api/lib/api/client/channel.ex,
elixir/apps/domain/lib/domain/crypto.ex, elixir/apps/domain/lib/domain/relays.ex), for the
development portal and tests.

The real portal computes these; the gateway only consumes the results. Keeping them here,
pure and tested, lets the development portal behave like the real one: ICE credentials
that are stable per (client key, gateway key) pair, a fresh PSK per flow, and TURN REST
credentials a relay can verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field

from gateway.portal.keys import encode_key
from gateway.portal.messages import PortalIceCredentials
from gateway.types import Rng

TURN_CREDENTIALS_LIFETIME = 14 * 24 * 3600  # relays.ex: 14 days


@dataclass(frozen=True, slots=True)
class FlowIceCredentials:
    client: PortalIceCredentials
    gateway: PortalIceCredentials


def derive_ice_credentials(
    client_id: uuid.UUID, client_public_key: str, gateway_id: uuid.UUID, gateway_public_key: str
) -> FlowIceCredentials:
    """``generate_ice_credentials`` (channel.ex): SHA-256 over
    ``client_id:client_key:gateway_id:gateway_key``, base32 lowercase.

    Slices of the 52 characters: client ufrag [0,4), client pwd [4,26), gateway ufrag
    [26,30), gateway pwd [30,52).
    """
    seed = f"{client_id}:{client_public_key}:{gateway_id}:{gateway_public_key}"
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    text = base64.b32encode(digest).decode("ascii").rstrip("=").lower()
    return FlowIceCredentials(
        client=PortalIceCredentials(text[0:4], text[4:26]),
        gateway=PortalIceCredentials(text[26:30], text[30:52]),
    )


def generate_preshared_key(rng: Rng) -> str:
    """``Domain.Crypto.psk``: 32 random bytes, standard base64 with padding."""
    return encode_key(rng.randbytes(32))


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    username: str
    password: str = field(repr=False)
    expires_at: int


def _salt(rng: Rng) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(16)).decode("ascii").rstrip("=")


def coturn_rest_credentials(
    secret: str, unix_now: float, rng: Rng, lifetime: int = TURN_CREDENTIALS_LIFETIME
) -> TurnCredentials:
    """TURN REST credentials as coturn's ``--use-auth-secret`` verifies them.

    username ``<expiry>:<salt>``, password base64(HMAC-SHA1(secret, username)). The
    username shape is the real portal's; the password formula is coturn's, because the
    relay in our tests is coturn rather than Firezone's relay.
    """
    expires_at = int(unix_now) + lifetime
    username = f"{expires_at}:{_salt(rng)}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredentials(username, base64.b64encode(digest).decode("ascii"), expires_at)


def firezone_relay_credentials(
    secret: str, unix_now: float, rng: Rng, lifetime: int = TURN_CREDENTIALS_LIFETIME
) -> TurnCredentials:
    """``generate_username_and_password`` (relays.ex) as the real portal does it for Firezone's
    relay (SHA-256, unpadded base64)."""
    expires_at = int(unix_now) + lifetime
    salt = _salt(rng)
    digest = hashlib.sha256(f"{expires_at}:{secret}:{salt}".encode()).digest()
    password = base64.b64encode(digest).decode("ascii").rstrip("=")
    return TurnCredentials(f"{expires_at}:{salt}", password, expires_at)
