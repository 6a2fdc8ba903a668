"""A whole-gateway deterministic simulation, checked step by step against a reference model.

Hypothesis drives random sequences of operations — authorize, send (both directions,
spoofed too), filter change, expiry, reject, roam, reset, portal drop, relay change,
time passing — over :class:`tests.sim.whole.world.World` (portal, dev-client cores,
relays, resources and the gateway, on a manual clock) and checks each against
:class:`tests.sim.whole.model.Model`. See ``README.md`` in this folder.

Runs: the default is short (CI). ``FZ_SIM_LONG=1`` runs many more and longer sequences;
``FZ_SIM_SEED=<n>`` runs with another hypothesis seed (random otherwise derandomized, so
a failure reproduces by rerunning; hypothesis prints the failing steps, starting with
``state.setup(seed=...)``, and a ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from devclient.core import DirectPath as ClientDirectPath
from devclient.core import RelayedPath as ClientRelayedPath
from gateway.portal.derive import derive_ice_credentials
from tests.sim.whole.model import Model
from tests.sim.whole.world import (
    GATEWAY_ID,
    PROTOS,
    AuthorizeSent,
    SimClient,
    World,
    build_packet,
)

LONG = os.environ.get("FZ_SIM_LONG", "") not in ("", "0")
SEED = os.environ.get("FZ_SIM_SEED")

#: How long a client may take to get its connection up after a flow was authorized (ICE
#: checks, a TURN allocation, a WireGuard handshake): "not yet" is fine, "never" is not.
CONNECT_BOUND = 30.0
#: Time given to a packet (and its answer) to cross the simulated network.
TRANSIT = 0.05
CLIENTS = 2
RESOURCES = 3
LIFETIMES = (None, 20.0, 60.0, 120.0)
PORTS = (53, 80, 443, 8080)
FILTER_SETS: tuple[list[dict[str, Any]], ...] = (
    [],
    [{"protocol": "udp", "port_range_start": 53, "port_range_end": 53}],
    [{"protocol": "tcp", "port_range_start": 80, "port_range_end": 443}],
    [{"protocol": "icmp"}],
    [{"protocol": "udp", "port_range_start": 1, "port_range_end": 100},
     {"protocol": "tcp", "port_range_start": 8080, "port_range_end": 8080}],
)
#: (client, resource) pairs the portal's policy refuses.
FORBIDDEN = {(1, 2)}


class WholeGatewayMachine(RuleBasedStateMachine):
    world: World
    model: Model

    @initialize(world_seed=st.integers(0, 2**32 - 1))
    def setup(self, world_seed: int) -> None:
        self.world = World(world_seed, clients=CLIENTS, resources=RESOURCES)
        self.model = Model()
        self.rids = list(self.world.portal.resources)
        for c, r in FORBIDDEN:
            self.world.portal.forbidden.add((self.world.clients[c].id, self.rids[r]))
        self.lifetime: float | None = None
        self.world.portal.lifetime = lambda c, r: self.lifetime
        self.world.portal.on_authorize = self._on_authorize
        self.tags = (f"{n:08x}".encode() for n in itertools.count())
        self.checked = {"arrived": 0, "dropped": 0, "unchecked": 0}
        for c in range(CLIENTS):  # start with every client connected: more steps check
            self.authorize(c, c % RESOURCES, None)

    # ------------------------------------------------------------------ helpers

    @property
    def unix(self) -> float:
        return self.world.clock.unix()

    def _on_authorize(self, sent: AuthorizeSent) -> None:
        """The portal sent ``authorize_flow``: with the gateway's current key, and ICE
        credentials derived from it; the model takes the authorization."""
        gateway = self.world.gateway
        assert sent.gateway_key == gateway.public_key, "portal authorizes with a stale key"
        client = next(c for c in self.world.clients if c.id == sent.client_id)
        derived = derive_ice_credentials(client.id, client.public_key, GATEWAY_ID,
                                         gateway.public_key)
        assert sent.gateway_ice_username == derived.gateway.username
        self.model.authorized((sent.client_id, sent.resource_id), sent.expires_at, sent.unix)

    def _await_up(self, client: SimClient, since: int, what: str) -> None:
        """If the portal authorized a flow for ``client`` since ``since``, its connection
        must be up within CONNECT_BOUND."""
        flows = [a for a in self.world.portal.authorized[since:] if a.client_id == client.id]
        if not flows:
            self.world.run(1.0)
            return
        up = self.world.run(CONNECT_BOUND, lambda: self.world.client_up(client))
        assert up, f"{client.name}: no connection {CONNECT_BOUND} s after {what}"

    def _tag(self) -> bytes:
        return next(self.tags)

    def _check(self, expected: bool | None, arrived: bool, what: str) -> None:
        if expected is None:
            self.checked["unchecked"] += 1
            return
        self.checked["arrived" if expected else "dropped"] += 1
        assert arrived == expected, (
            f"{what}: {'arrived' if arrived else 'dropped'}, the model says "
            f"{'arrive' if expected else 'drop'}")

    # ------------------------------------------------------------------ rules

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1),
          lifetime=st.sampled_from(LIFETIMES))
    def authorize(self, c: int, r: int, lifetime: float | None) -> None:
        """The client asks for a resource (create_flow -> authorize_flow -> flow_created)."""
        client = self.world.clients[c]
        self.lifetime = lifetime
        since = len(self.world.portal.authorized)
        client.core.request(str(self.rids[r]), self.world.now)
        self._await_up(client, since, f"authorizing resource {r}")

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1),
          proto=st.sampled_from(PROTOS), port=st.sampled_from(PORTS))
    def send_tun(self, c: int, r: int, proto: str, port: int) -> None:
        self.send(c, r, proto, port, "tun")

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1),
          proto=st.sampled_from(PROTOS), port=st.sampled_from(PORTS))
    def send_inject(self, c: int, r: int, proto: str, port: int) -> None:
        self.send(c, r, proto, port, "inject")

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1),
          proto=st.sampled_from(PROTOS))
    def send_spoofed(self, c: int, r: int, proto: str) -> None:
        self.send(c, r, proto, 53, "spoofed")

    def send(self, c: int, r: int, proto: str, port: int, how: str) -> None:
        """Client -> resource: through the client's routing ("tun"), straight into its
        tunnel whatever the client's routes ("inject"), or with another source address
        ("spoofed"); the resource answers what arrives."""
        world, client = self.world, self.world.clients[c]
        resource = world.portal.resources[self.rids[r]]
        tag = self._tag()
        source = client.ipv4 if how != "spoofed" else "100.66.9.9"
        packet = build_packet(source, resource.host, proto, port, b"req:" + tag)
        up = world.client_up(client)
        expected = self.model.delivers((client.id, resource.id), proto, port, self.unix)
        if how == "spoofed":
            expected = False
        if how == "tun":
            before = client.core.counters["tun_no_connection"]
            client.core.handle_tun_packet(packet, world.now, self.unix)
            sent = up and client.core.counters["tun_no_connection"] == before
        else:
            sent = up and any(client.core.inject(str(rid), packet, world.now, self.unix)
                              for rid in self.rids)
        registered = self.model.client_registered(client.id, self.unix)
        since = len(world.portal.authorized)
        world.run(TRANSIT)
        arrived = b"req:" + tag in world.arrived[resource.host]
        _note(f"send {how} {client.name}->{r} {proto}/{port}: up={up} sent={sent} "
             f"expected={expected} arrived={arrived}")
        self._check(expected if sent else None, arrived, f"{client.name} -> resource {r} "
                    f"{proto}/{port} ({how})")
        if arrived:
            self._check(registered, b"rep:" + tag in client.received,
                        f"answer of resource {r} to {client.name}")
        if not sent and how == "tun":
            # Traffic without a connection asks for the flow again (devclient/core.py):
            # once authorized, the connection must come up.
            self._await_up(client, since, "traffic asked for the flow again")

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1))
    def resource_sends(self, c: int, r: int) -> None:
        """A resource -> client packet nobody asked for: it reaches a client the gateway
        holds any authorization for (1.4 routes the TUN by client address)."""
        world, client = self.world, self.world.clients[c]
        resource = world.portal.resources[self.rids[r]]
        tag = b"uns:" + self._tag()
        up = world.client_up(client)
        expected = self.model.client_registered(client.id, self.unix)
        world.gateway.tun_packet_in(build_packet(resource.host, client.ipv4, "udp", 40000, tag))
        world.run(TRANSIT)
        self._check(expected if up else None, tag in client.received,
                    f"resource {r} -> {client.name}")

    @rule(r=st.integers(0, RESOURCES - 1), filters=st.sampled_from(FILTER_SETS))
    def change_filters(self, r: int, filters: list[dict[str, Any]]) -> None:
        self.model.filters[self.rids[r]] = filters
        self.world.portal.update_filters(self.rids[r], filters)
        self.world.run(TRANSIT)

    @rule(c=st.integers(0, CLIENTS - 1), r=st.integers(0, RESOURCES - 1))
    def reject(self, c: int, r: int) -> None:
        client = self.world.clients[c]
        self.model.rejected((client.id, self.rids[r]))
        self.world.portal.reject_access(client, self.rids[r])
        self.world.run(TRANSIT)

    @rule()
    def expire(self) -> None:
        """Time passes the soonest expiry of an authorization (or 5 s if none)."""
        unix = self.unix
        ends = [a.expires_at for a in self.model.auth.values()
                if a.expires_at is not None and a.expires_at > unix and a.unknown_until is None]
        wait = min(ends) - unix + 1.5 if ends else 5.0
        self.world.run(wait)

    @rule(seconds=st.sampled_from((0.5, 5.0, 30.0)))
    def tick(self, seconds: float) -> None:
        self.world.run(seconds)

    @rule(c=st.integers(0, CLIENTS - 1))
    def roam(self, c: int) -> None:
        """The client's address changes; it drops its connections and asks again."""
        client = self.world.clients[c]
        client.local = (client.local[0], client.local[1] + 1)
        since = len(self.world.portal.authorized)
        client.core.roam(client.local, self.world.now)
        self._await_up(client, since, "roaming")

    @rule()
    def reset(self) -> None:
        """The gateway rotates its key: every connection and authorization is gone, the
        portal sees the new key on the reconnect."""
        world = self.world
        old = world.gateway.public_key
        joins = world.portal.joins
        world.gateway.reset()
        self.model.reset()
        world.run(TRANSIT)
        assert world.portal.joins == joins + 1, "no reconnect after the reset"
        assert world.portal.gateway_key == world.gateway.public_key
        assert world.portal.gateway_key != old, "the portal still sees the old key"

    @rule()
    def portal_drop(self) -> None:
        """The portal connection drops; the gateway rejoins with the same key and gets a
        fresh init with rotated TURN credentials; connections and flows stay."""
        world = self.world
        key = world.gateway.public_key
        usernames = len(world.portal.turn_usernames)
        world.portal.gateway_connect(key)
        world.run(TRANSIT)
        assert world.portal.gateway_key == key
        fresh = world.portal.turn_usernames[usernames:]
        assert fresh and not set(fresh) & set(world.portal.turn_usernames[:usernames])

    @rule(add=st.integers(0, 2), remove=st.booleans())
    def relay_change(self, add: int, remove: bool) -> None:
        """relays_presence: a relay joins, and maybe the oldest one leaves (one stays)."""
        world = self.world
        added = [world.relay_pool[add]] if world.relay_pool[add] not in world.relays else []
        world.relays += added
        removed = [world.relays[0]] if remove and len(world.relays) > 1 else []
        for relay in removed:
            world.relays.remove(relay)
        gone = {relay.server.address[0] for relay in removed}
        for client in world.clients:
            conn = client.core.connection(str(GATEWAY_ID))
            path = conn.path if conn is not None else None
            if isinstance(path, ClientRelayedPath) or (
                    isinstance(path, ClientDirectPath) and path.remote[0] in gone):
                self.model.uncertain(client.id)  # its path went through a relay
        world.portal.relays_presence(removed, added)
        world.run(1.0)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def portal_knows_the_key(self) -> None:
        if hasattr(self, "world"):
            assert self.world.portal.gateway_key == self.world.gateway.public_key

    def teardown(self) -> None:
        if hasattr(self, "world"):
            _note(f"checked: {self.checked}")


def _note(text: str) -> None:
    """``note`` inside hypothesis; nothing when a test drives the machine by hand."""
    with contextlib.suppress(InvalidArgument):
        note(text)


def _settings() -> settings:
    return settings(
        max_examples=400 if LONG else 60,
        stateful_step_count=100 if LONG else 50,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Thousands of simulated steps log at DEBUG; formatting that would cost most of the
    run. WARNING and above still reach the secret scan."""
    loggers = [logging.getLogger(name) for name in ("gateway", "devclient")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@pytest.mark.configures_logging
@pytest.mark.timeout(900)  # a failure shrinks for up to 5 minutes: keep its report
def test_whole_gateway_against_the_model() -> None:
    machine: Any = WholeGatewayMachine
    if SEED is not None:
        machine = seed(int(SEED))(WholeGatewayMachine)
    with _quiet():
        run_state_machine_as_test(machine, settings=_settings())


@pytest.mark.configures_logging
def test_a_short_fixed_scenario_checks_every_kind_of_step() -> None:
    """Every rule once, in an order that exercises each model rule (a smoke test that the
    world works, independent of what hypothesis picks)."""
    with _quiet():
        _fixed_scenario()


def _fixed_scenario() -> None:
    m = WholeGatewayMachine()
    m.setup(world_seed=7)
    m.change_filters(0, FILTER_SETS[1])
    m.authorize(0, 0, 20.0)
    m.send(0, 0, "udp", 53, "tun")
    m.send(0, 0, "udp", 80, "tun")
    m.send(0, 0, "udp", 53, "spoofed")
    m.send(0, 1, "udp", 53, "inject")
    m.resource_sends(0, 0)
    m.authorize(1, 2, None)  # forbidden
    m.authorize(1, 1, None)
    m.roam(1)
    m.send(1, 1, "tcp", 443, "tun")
    m.portal_drop()
    m.relay_change(1, True)
    m.send(1, 1, "icmp", 53, "tun")
    m.reject(1, 1)
    m.send(1, 1, "icmp", 53, "tun")
    m.expire()
    m.send(0, 0, "udp", 53, "tun")
    m.reset()
    m.send(0, 0, "udp", 53, "tun")
    m.authorize(0, 0, None)
    m.send(0, 0, "udp", 53, "tun")
    m.tick(30.0)
    m.teardown()
    assert m.checked["arrived"] >= 4 and m.checked["dropped"] >= 4, m.checked
