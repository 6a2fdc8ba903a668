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

from gateway.portal.messages import EgressMessage, IngressMessage

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
    reconnects: int  #: connection attempts after the first
    url: str  #: redacted login URL (no token)


# ----------------------------------------------------------------- notifications


@dataclass(frozen=True, slots=True)
class PortalIngress:
    message: IngressMessage


@dataclass(frozen=True, slots=True)
class PortalJoined:
    """Joined topic ``gateway``; an ``init`` follows."""


@dataclass(frozen=True, slots=True)
class PortalDisconnected:
    """Lost the portal (transient); the actor reconnects on its own."""

    reason: str


@dataclass(frozen=True, slots=True)
class PortalFatal:
    """The portal refused us for good: the app should exit with ``exit_code``."""

    reason: str
    exit_code: int


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
