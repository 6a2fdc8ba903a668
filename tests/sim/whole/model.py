"""The reference model: what the gateway must do, small enough to be obviously right.

State: (client, resource) -> authorization (``expires_at`` in unix seconds or None), each
resource's filters, and the gateway keys. Rules (Firezone 1.4 gateway):

* ``authorize_flow`` for a pair not authorized adds it; for a pair still authorized it
  changes only the filters — the expiry stays the first one (``ClientOnGateway.add_resource``).
* ``reject_access`` removes it; so does time passing its ``expires_at``; a reset of the
  gateway removes all (its connections, and with them every authorization, are gone).
* A packet from client C to resource R with (protocol, port) must reach R iff C holds an
  authorization for R that has not expired and R's filters allow (protocol, port) (no
  filters: everything); a packet whose source is not C's tunnel address never arrives.
* A packet from a resource to C reaches C iff C holds any authorization.
* After a reset the portal must know the NEW key; after a portal drop, the same key.

Where the model cannot know (an expiry within the gateway's tick slack, or a client whose
connection the gateway may have dropped because its relay went away), the answer is
``None``: not checked, rather than guessed.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

#: Expiry is checked by a tick that may run up to this much after ``expires_at``.
EXPIRY_SLACK = 1.0

Pair = tuple[uuid.UUID, uuid.UUID]


@dataclass
class Authorization:
    expires_at: float | None
    #: Not None: the model cannot tell whether the gateway still has it before this time;
    #: after it, it is certainly gone.
    unknown_until: float | None = None


class Model:
    def __init__(self) -> None:
        self.auth: dict[Pair, Authorization] = {}
        self.filters: dict[uuid.UUID, list[dict[str, Any]]] = {}

    # ---- state

    def state(self, pair: Pair, unix: float) -> bool | None:
        """True: authorized; False: not; None: cannot tell."""
        auth = self.auth.get(pair)
        if auth is None:
            return False
        if auth.unknown_until is not None:
            if unix >= auth.unknown_until:
                del self.auth[pair]
                return False
            return None
        if auth.expires_at is None or unix < auth.expires_at:
            return True
        if unix >= auth.expires_at + EXPIRY_SLACK:
            del self.auth[pair]
            return False
        return None

    def client_registered(self, client: uuid.UUID, unix: float) -> bool | None:
        answers = [self.state(pair, unix) for pair in list(self.auth) if pair[0] == client]
        if True in answers:
            return True
        if None in answers:
            return None
        return False

    # ---- transitions

    def authorized(self, pair: Pair, expires_at: float | None, unix: float) -> None:
        now_state = self.state(pair, unix)
        if now_state is False:
            self.auth[pair] = Authorization(expires_at)
        elif now_state is None:
            auth = self.auth[pair]
            ends = [auth.unknown_until, auth.expires_at, expires_at]
            latest = math.inf if None in ends[1:] else max(e for e in ends if e is not None)
            auth.unknown_until = latest + EXPIRY_SLACK
        # True: the first expiry stays

    def rejected(self, pair: Pair) -> None:
        self.auth.pop(pair, None)

    def reset(self) -> None:
        self.auth.clear()

    def uncertain(self, client: uuid.UUID) -> None:
        """The gateway may have dropped this client's connection (and authorizations)."""
        for pair, auth in self.auth.items():
            if pair[0] == client and auth.unknown_until is None:
                auth.unknown_until = (math.inf if auth.expires_at is None
                                      else auth.expires_at + EXPIRY_SLACK)

    # ---- expectations

    def delivers(self, pair: Pair, proto: str, port: int, unix: float) -> bool | None:
        state = self.state(pair, unix)
        if state is not True:
            return state
        return allows(self.filters.get(pair[1], []), proto, port)


def allows(filters: list[dict[str, Any]], proto: str, port: int) -> bool:
    if not filters:
        return True
    for f in filters:
        if f["protocol"] == proto == "icmp":
            return True
        if f["protocol"] == proto and f["port_range_start"] <= port <= f["port_range_end"]:
            return True
    return False
