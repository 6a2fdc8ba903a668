"""Messages to and from the PortalActor (frozen: Pykka does not copy messages).

Inbound commands: :class:`Connect`, :class:`KeyRotated`, :class:`SendToPortal`,
:class:`GetPortalStatus` (ask; answered with :class:`PortalStatus`), and
``actors.timer.Wake``. Upward notifications told to the listener: :class:`PortalIngress`,
:class:`PortalJoined`, :class:`PortalDisconnected`, :class:`PortalFatal`. The
``Socket*`` messages are internal: the websocket reader thread tells them to the actor,
tagged with the connection generation so that news from a replaced socket is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.portal.messages import EgressMessage
from gateway.portal.phoenix import Disconnected, Fatal, Ingress, Joined

# ----------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Connect:
    """Connect (or force a reconnect) with this WireGuard public key (base64)."""

    public_key: str


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """The node rotated its key: drop the socket and log in again with the new key."""

    public_key: str


@dataclass(frozen=True, slots=True)
class SendToPortal:
    message: EgressMessage


@dataclass(frozen=True, slots=True)
class GetPortalStatus:
    """Ask the actor; the answer is a :class:`PortalStatus`."""


@dataclass(frozen=True, slots=True)
class PortalStatus:
    state: str
    joined_since: float | None  #: monotonic time of the last join, None when not joined
    reconnects: int  #: times joined again after having been joined (not attempts)
    url: str  #: redacted login URL (no token)
    connection_attempts: int = 0  #: websocket connections opened, failed ones included
    malformed_frames: int = 0  #: inbound frames refused (unparseable, over the bounds, unknown)


# ----------------------------------------------------------------- notifications


# The PortalActor tells its listener the Phoenix core's own events, unchanged (they are
# immutable): these names are what listeners match on.
PortalIngress = Ingress
PortalJoined = Joined
PortalDisconnected = Disconnected
PortalFatal = Fatal


# ----------------------------------------------------------------- internal (reader thread)


@dataclass(frozen=True, slots=True)
class SocketOpened:
    generation: int


@dataclass(frozen=True, slots=True)
class SocketFrame:
    generation: int
    text: str


@dataclass(frozen=True, slots=True)
class SocketClosed:
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class SocketFailed:
    generation: int
    http_status: int | None
    reason: str
