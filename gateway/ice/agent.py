"""A sans-IO ICE agent: full ICE, trickle, one component, UDP (RFC 8445, 8838, 7675).

Theory of operation
-------------------
Local candidates that send from their own address (host, relay) are paired with every
remote candidate of the same IP family; a server-reflexive local candidate sends from its
base, so it is redundant with the host candidate of that base (RFC 8445 §6.1.2.4) and is
kept only as a record. Pairs are keyed by (local base, remote address).

Every pair runs the same check schedule (str0m's model, the ICE agent
rust/connlib/snownet/src/node.rs uses): a check goes out as soon as the pair exists (pacing ``Ta``
defaults to 0), and while checks go unanswered the next one follows after an RTO of 250, 500, 1000,
1500, 1500 ... ms (each a new transaction; a late answer to any of the last few still counts). Once
answered, the pair is re-checked every max RTO (1.5 s, idle 60 s): these re-checks are the consent
and keepalive traffic. A pair whose last ``max_retransmits`` consecutive checks stay unanswered for
one more RTO fails (str0m's count: 9.25 s after a new pair's first check, 10.75 s after a connected
pair's last answer, 300 s when idle).

Pair states::

    WAITING --check sent--> IN_PROGRESS --response--> SUCCEEDED
       ^                         |  (timeout / error)      | (timeout)
       +--- triggered check ---- FAILED <------------------+

Nomination: the controlling side (ours, in simulations and interop) uses regular
nomination: once the best pair succeeded (or a short wait after the first success) it
re-checks that pair with USE-CANDIDATE; the answer nominates it. The controlled side (the
gateway) nominates a pair when a USE-CANDIDATE request arrives on it and its own check on
that pair succeeded (before or after). Aggressive nomination (aioice puts USE-CANDIDATE on
every check) works the same way: the highest-priority nominated live pair is selected, so
the first success wins and a later higher-priority one switches.

Agent states: ``checking`` until the first nomination, then ``connected``. When the
selected pair fails, the agent falls back to the best live nominated pair, else to the best
live succeeded pair (the controlling side nominates it); with none left it reports
``Disconnected``. In ``checking``, the agent disconnects once every pair has failed. The
agent keeps answering the peer's checks for as long as it lives.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from gateway.drops import Drop, Event
from gateway.errors import MalformedPacket
from gateway.ice.candidate import Candidate, IceCredentials, foundation_for, prflx_priority
from gateway.stun.message import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    encode,
    new_request,
    new_response,
    short_term_key,
    verify_integrity,
)
from gateway.types import Address, Rng, Transmit

logger = logging.getLogger(__name__)

#: How long the controlling side waits after the first success for better pairs to finish.
NOMINATION_WAIT = 0.5
#: Transactions remembered per pair, so a late answer to a retransmission still counts.
_TRANSACTIONS_PER_PAIR = 10
#: Addresses remembered for ``accepts_from`` (verified ICE traffic only).
_MAX_SEEN_FROM = 64
#: Remote candidates kept (signalled and learned): a client has a few per interface and
#: family; more would only cost a scan each (pairs are capped separately).
MAX_REMOTE_CANDIDATES = 100


#: A selected pair with this many consecutive unanswered checks gives way to another
#: nominated pair that still answers (see ``IceAgent._reselect``).
SILENT_AFTER_CHECKS = 2


@dataclass(frozen=True, slots=True)
class StunTimings:
    """Check timing (rust/connlib/snownet/src/node.rs): RTO doubling from ``initial_rto`` up to
    ``max_rto``."""

    initial_rto: float
    max_rto: float
    max_retransmits: int

    def rto(self, unanswered: int) -> float:
        """Delay after the ``unanswered``-th consecutive unanswered check (1-based)."""
        return min(self.initial_rto * (2.0 ** max(unanswered - 1, 0)), self.max_rto)


DEFAULT_TIMINGS = StunTimings(initial_rto=0.25, max_rto=1.5, max_retransmits=8)
IDLE_TIMINGS = StunTimings(initial_rto=60.0, max_rto=60.0, max_retransmits=4)


# ---- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nominated:
    """The selected pair is new or changed: send from ``local.base`` to ``remote``."""

    local: Candidate
    remote: Address


@dataclass(frozen=True, slots=True)
class Disconnected:
    """No usable pair remains (the connection should fail: "ICE timeout")."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerReflexive:
    """A remote peer-reflexive candidate was learned from a check."""

    address: Address


IceEvent = Nominated | Disconnected | PeerReflexive


# ---- pairs -----------------------------------------------------------------------------


class PairState(Enum):
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class _Pair:
    """One candidate pair and its check schedule (mutable, agent-private)."""

    __slots__ = ("due", "last_sent", "local", "nominated", "priority", "remote",
                 "remote_nominated", "state", "transactions", "unanswered", "use_candidate")

    def __init__(self, local: Candidate, remote: Candidate, priority: int, now: float) -> None:
        self.local = local
        self.remote = remote
        self.priority = priority
        self.state = PairState.WAITING
        self.due: float | None = now
        self.last_sent: float | None = None
        self.unanswered = 0
        self.nominated = False
        self.use_candidate = False  # controlling: our checks on it carry USE-CANDIDATE
        self.remote_nominated = False  # controlled: the peer sent USE-CANDIDATE on it
        self.transactions: deque[bytes] = deque()

    @property
    def key(self) -> tuple[Address, Address]:
        return _base(self.local), self.remote.address

    def __repr__(self) -> str:
        return f"<Pair {self.local.kind} {self.key[0]} -> {self.remote.address} {self.state.value}>"


@dataclass(frozen=True, slots=True)
class _Transaction:
    pair_key: tuple[Address, Address]
    use_candidate: bool
    controlling: bool


def _base(c: Candidate) -> Address:
    return c.base if c.base is not None else c.address


def _family(addr: Address) -> int:
    return 6 if ":" in addr[0] else 4


def pair_priority(controlling: Candidate, controlled: Candidate) -> int:
    """RFC 8445 §6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D ? 1 : 0)."""
    g, d = controlling.priority, controlled.priority
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


class IceAgent:
    """ICE agent for one connection; see the module docstring for the behaviour.

    Sans-IO: feed ``handle_stun`` / ``handle_timeout`` with ``now`` (monotonic seconds),
    drain ``poll_transmit`` / ``poll_event``, wake up at ``poll_timeout``.
    """

    def __init__(
        self,
        *,
        controlling: bool,
        local: IceCredentials,
        remote: IceCredentials | None,
        rng: Rng,
        now: float,
        max_pairs: int = 300,
        max_remote_candidates: int = MAX_REMOTE_CANDIDATES,
        pacing: float = 0.0,
    ) -> None:
        self.controlling = controlling
        self.local_credentials = local
        self.remote_credentials = remote
        self._rng = rng
        self._tie_breaker = rng.getrandbits(64)
        self._max_pairs = max_pairs
        self._max_remote = max_remote_candidates
        self._pacing = pacing
        self._next_paced_check = now
        self._timings = DEFAULT_TIMINGS
        self._local_key = short_term_key(local.pwd)
        self._remote_key = None if remote is None else short_term_key(remote.pwd)
        self._local_candidates: list[Candidate] = []
        self._remote_candidates: list[Candidate] = []
        self._pairs: dict[tuple[Address, Address], _Pair] = {}
        self._transactions: dict[bytes, _Transaction] = {}
        self._selected: _Pair | None = None
        self._first_success: float | None = None
        self._seen_from: set[Address] = set()
        self._verified_raw: bytes | None = None
        self._transmits: deque[Transmit] = deque()
        self._events: deque[IceEvent] = deque()
        self._now = now
        self.state = "checking"
        self.counters: Counter[str] = Counter()

    # ---- configuration ----------------------------------------------------------------

    def set_remote_credentials(self, remote: IceCredentials) -> None:
        """Late remote credentials (checks start at the next ``handle_timeout``)."""
        self.remote_credentials = remote
        self._remote_key = short_term_key(remote.pwd)

    def set_idle(self, idle: bool, now: float) -> None:
        """Switch between idle (60 s) and default (1.5 s) check timings
        (rust/connlib/snownet/src/node.rs)."""
        timings = IDLE_TIMINGS if idle else DEFAULT_TIMINGS
        if timings is self._timings:
            return
        self._timings = timings
        for pair in self._pairs.values():
            if pair.state is not PairState.FAILED and pair.last_sent is not None:
                pair.due = pair.last_sent + self._delay_after(pair)

    @property
    def local_candidates(self) -> list[Candidate]:
        return list(self._local_candidates)

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._remote_candidates)

    def pair_states(self) -> dict[tuple[Address, Address], PairState]:
        """(local base, remote address) -> state; for diagnostics and tests."""
        return {key: pair.state for key, pair in self._pairs.items()}

    # ---- candidates -------------------------------------------------------------------

    def add_local_candidate(self, c: Candidate, now: float | None = None) -> bool:
        """Add a local candidate; False if it duplicates one we have or is unusable."""
        if c.component != 1 or c.kind == "prflx":
            self.counters[Drop.LOCAL_CANDIDATE_REJECTED] += 1
            return False
        if any(o.kind == c.kind and o.address == c.address and _base(o) == _base(c)
               for o in self._local_candidates):
            return False
        self._local_candidates.append(c)
        if c.kind != "srflx":
            for remote in self._remote_candidates:
                self._add_pair(c, remote, self._pair_time(now))
        return True

    def invalidate_local_candidate(self, address: Address, now: float | None = None) -> bool:
        """Forget local candidates at ``address`` and their pairs (e.g. a relay went away);
        False if there was none, so nobody need be told it is gone."""
        kept = [c for c in self._local_candidates if c.address != address]
        if len(kept) == len(self._local_candidates):
            return False
        self._local_candidates = kept
        doomed = [key for key, pair in self._pairs.items() if pair.local.address == address]
        self._remove_pairs(doomed, self._pair_time(now))
        return True

    @property
    def remote_candidates_full(self) -> bool:
        return len(self._remote_candidates) >= self._max_remote

    def has_remote_candidate(self, address: Address) -> bool:
        """Whether a remote candidate (signalled or learned) is at ``address``."""
        return self._remote_at(address) is not None

    def add_remote_candidate(self, c: Candidate, now: float | None = None) -> bool:
        """Add a trickled remote candidate; False if duplicate, unusable or one too many."""
        if c.component != 1:
            self.counters[Drop.REMOTE_CANDIDATE_REJECTED] += 1
            return False
        for i, existing in enumerate(self._remote_candidates):
            if existing.address != c.address:
                continue
            if existing.kind == "prflx" and c.kind != "prflx":
                # The signalled candidate replaces what we learned from a check.
                self._remote_candidates[i] = c
                for pair in self._pairs.values():
                    if pair.remote.address == c.address:
                        pair.remote = c
                        pair.priority = self._priority_of(pair.local, c)
                return True
            return False
        if len(self._remote_candidates) >= self._max_remote:
            self.counters[Drop.REMOTE_CANDIDATES_FULL] += 1
            return False
        self._remote_candidates.append(c)
        at = self._pair_time(now)
        for local in self._local_candidates:
            if local.kind != "srflx":
                self._add_pair(local, c, at)
        return True

    def invalidate_remote_candidate(self, c: Candidate, now: float | None = None) -> None:
        """Remove a remote candidate (and learned prflx at its address); may disconnect."""
        self._remote_candidates = [r for r in self._remote_candidates if r.address != c.address]
        self._seen_from.discard(c.address)
        doomed = [key for key, pair in self._pairs.items() if pair.remote.address == c.address]
        self._remove_pairs(doomed, self._pair_time(now))

    # ---- STUN input ---------------------------------------------------------------------

    def accepts(self, msg: StunMessage, raw: bytes) -> bool:
        """Whether this datagram belongs to this agent (the demultiplexing of
        rust/connlib/snownet/src/node.rs)."""
        if msg.method != Method.BINDING:
            return False
        if msg.cls == MessageClass.REQUEST:
            return self._authentic_request(msg, raw)
        if msg.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            return msg.transaction_id in self._transactions
        return False

    def handle_stun(
        self, msg: StunMessage, raw: bytes, src: Address, local: Address, now: float
    ) -> None:
        """A STUN message from ``src`` that arrived on our ``local`` address (host or relayed)."""
        self._now = max(self._now, now)
        try:
            if msg.method != Method.BINDING:
                self._drop(Drop.NOT_BINDING, src)
            elif msg.cls == MessageClass.REQUEST:
                self._handle_request(msg, raw, src, local, now)
            elif msg.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
                self._handle_response(msg, raw, src, local, now)
            else:
                self._drop(Drop.INDICATION, src)
        except MalformedPacket as exc:
            self._drop(Drop.MALFORMED, src, str(exc))
        finally:
            self._verified_raw = None

    def _authentic_request(self, msg: StunMessage, raw: bytes) -> bool:
        if raw is self._verified_raw:
            return True
        try:
            username = msg.username()
        except MalformedPacket:
            return False
        if username is None or not self._username_matches(username):
            return False
        if not verify_integrity(raw, self._local_key):
            return False
        self._verified_raw = raw
        return True

    def _username_matches(self, username: str) -> bool:
        ours, colon, theirs = username.partition(":")
        if colon != ":" or ours != self.local_credentials.ufrag:
            return False
        return self.remote_credentials is None or theirs == self.remote_credentials.ufrag

    def _handle_request(
        self, msg: StunMessage, raw: bytes, src: Address, local: Address, now: float
    ) -> None:
        if not self._authentic_request(msg, raw):
            self._drop(Drop.REQUEST_UNAUTHENTICATED, src)
            return
        if self._role_conflict(msg, src, local):
            return
        response = new_response(msg, MessageClass.SUCCESS)
        response.add_xor_address(Attr.XOR_MAPPED_ADDRESS, src)
        payload = encode(response, integrity_key=self._local_key, fingerprint=True)
        self._transmits.append(Transmit(local, src, payload))
        self._remember_peer(src)

        local_candidate = self._local_for_base(local)
        if local_candidate is None:
            self.counters[Drop.REQUEST_ON_UNKNOWN_LOCAL] += 1
            logger.debug("check from %s on %s: no local candidate there", src, local)
            return
        remote = self._remote_at(src)
        if remote is None:
            if len(self._remote_candidates) >= self._max_remote:
                self._drop(Drop.REMOTE_CANDIDATES_FULL, src)  # answered, not paired
                return
            priority = msg.priority()
            if priority is None or priority == 0:
                self._drop(Drop.REQUEST_WITHOUT_PRIORITY, src)
                return
            remote = Candidate("prflx", src, priority, foundation_for("prflx", src[0]))
            self._remote_candidates.append(remote)
            self._events.append(PeerReflexive(src))
            logger.debug("learned peer-reflexive candidate %s", src)
        pair = self._pairs.get((local, src))
        if pair is None:
            if _family(local) != _family(src):
                self._drop(Drop.FAMILY_MISMATCH, src)
                return
            pair = self._add_pair(local_candidate, remote, now)
            if pair is None:
                return
        if pair.state is PairState.FAILED:
            # Triggered check (RFC 8445 §7.3.1.4): the peer reaches us on this pair again.
            pair.state = PairState.WAITING
            pair.unanswered = 0
            pair.due = now
        if msg.use_candidate() and not self.controlling:
            pair.remote_nominated = True
            self._probe_selected(pair, now)
            if pair.state is PairState.SUCCEEDED and not pair.nominated:
                pair.nominated = True
                self._reselect(now)

    def _role_conflict(self, msg: StunMessage, src: Address, local: Address) -> bool:
        """RFC 8445 §7.3.1.1; True when we answered 487 and the request is done."""
        theirs: int | None
        if self.controlling:
            theirs = msg.ice_controlling()
            if theirs is None:
                return False
            we_keep_role = self._tie_breaker >= theirs
        else:
            theirs = msg.ice_controlled()
            if theirs is None:
                return False
            we_keep_role = self._tie_breaker < theirs
        self.counters[Event.ROLE_CONFLICT] += 1
        if we_keep_role:
            error = new_response(msg, MessageClass.ERROR).add_error_code(487, "Role Conflict")
            payload = encode(error, integrity_key=self._local_key, fingerprint=True)
            self._transmits.append(Transmit(local, src, payload))
            return True
        self._switch_role()
        return False

    def _switch_role(self) -> None:
        self.controlling = not self.controlling
        logger.debug("switching ICE role to %s", "controlling" if self.controlling else
                     "controlled")
        for pair in self._pairs.values():
            pair.priority = self._priority_of(pair.local, pair.remote)

    def _handle_response(
        self, msg: StunMessage, raw: bytes, src: Address, local: Address, now: float
    ) -> None:
        txn = self._transactions.get(msg.transaction_id)
        if txn is None:
            self._drop(Drop.RESPONSE_UNKNOWN_TRANSACTION, src)
            return
        if self._remote_key is None or not verify_integrity(raw, self._remote_key):
            self._drop(Drop.RESPONSE_BAD_INTEGRITY, src)
            return
        pair = self._pairs.get(txn.pair_key)
        if pair is None:
            self._drop(Drop.RESPONSE_FOR_REMOVED_PAIR, src)
            return
        self._forget_transaction(pair, msg.transaction_id)
        if (local, src) != pair.key:
            # RFC 8445 §7.2.5.2.1: non-symmetric addresses fail the pair.
            self._drop(Drop.RESPONSE_NOT_SYMMETRIC, src)
            self._fail(pair, now)
            return
        if msg.cls == MessageClass.ERROR:
            code = msg.error_code()
            if code is not None and code[0] == 487:
                self.counters[Event.ROLE_CONFLICT] += 1
                if txn.controlling == self.controlling:
                    self._switch_role()
                pair.state = PairState.WAITING
                pair.unanswered = 0
                pair.due = now
                return
            self._drop(f"error_response_{code[0] if code else 'unknown'}", src)
            self._fail(pair, now)
            return
        self._remember_peer(src)
        pair.state = PairState.SUCCEEDED
        pair.unanswered = 0
        pair.due = (pair.last_sent if pair.last_sent is not None else now) + self._timings.max_rto
        if self._first_success is None:
            self._first_success = now
        if (txn.use_candidate and self.controlling) or (pair.remote_nominated
                                                        and not self.controlling):
            pair.nominated = True
        self._reselect(now)
        self._maybe_nominate(now)

    # ---- timers -----------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        """Send due checks, fail pairs out of retransmits, nominate when it is time."""
        self._now = max(self._now, now)
        if self._remote_key is None:
            return
        expired = [p for p in self._pairs.values() if p.due is not None and p.due <= now
                   and p.unanswered >= self._timings.max_retransmits]
        for pair in expired:
            self._fail(pair, now, reselect=False)
        if expired:
            self._reselect(now)
        self._maybe_nominate(now)
        for pair in sorted(self._pairs.values(), key=lambda p: -p.priority):
            if pair.due is None or pair.due > now:
                continue
            if pair.last_sent is None and self._pacing > 0:
                if self._next_paced_check > now:
                    continue
                self._next_paced_check = now + self._pacing
            self._send_check(pair, now)
        selected = self._selected
        if selected is not None and selected.unanswered >= SILENT_AFTER_CHECKS:
            self._reselect(now)

    def poll_timeout(self) -> float | None:
        """The next absolute deadline, or None when nothing is scheduled."""
        if self._remote_key is None:
            return None
        deadline: float | None = None
        for pair in self._pairs.values():
            due = pair.due
            if due is None:
                continue
            if pair.last_sent is None and self._pacing > 0:
                due = max(due, self._next_paced_check)
            if deadline is None or due < deadline:
                deadline = due
        nominate_at = self._nomination_deadline()
        if nominate_at is not None and (deadline is None or nominate_at < deadline):
            deadline = nominate_at
        return deadline

    # ---- output -----------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def selected_pair(self) -> tuple[Candidate, Address] | None:
        """(local candidate, remote address) of the pair data should use, if any."""
        pair = self._selected
        return None if pair is None else (pair.local, pair.remote.address)

    def accepts_from(self, addr: Address) -> bool:
        """Whether non-STUN traffic from ``addr`` belongs to this connection."""
        if addr in self._seen_from:
            return True
        selected = self._selected
        return selected is not None and selected.remote.address == addr

    # ---- internals --------------------------------------------------------------------

    def _pair_time(self, now: float | None) -> float:
        # Without a ``now`` a new pair is due at the latest time we were told about: the
        # caller's next poll_timeout/handle_timeout picks it up.
        if now is not None:
            self._now = max(self._now, now)
            return now
        return self._now

    def _priority_of(self, local: Candidate, remote: Candidate) -> int:
        if self.controlling:
            return pair_priority(local, remote)
        return pair_priority(remote, local)

    def _add_pair(self, local: Candidate, remote: Candidate, now: float) -> _Pair | None:
        if _family(local.address) != _family(remote.address):
            return None
        key = (_base(local), remote.address)
        if key in self._pairs:
            return self._pairs[key]
        pair = _Pair(local, remote, self._priority_of(local, remote), now)
        self._pairs[key] = pair
        if len(self._pairs) > self._max_pairs:
            self._prune(now)
        return self._pairs.get(key)

    def _prune(self, now: float) -> None:
        """Keep at most ``max_pairs``: drop the lowest-priority pairs nobody relies on."""
        removable = sorted(
            (p for p in self._pairs.values() if not p.nominated and p is not self._selected),
            key=lambda p: p.priority,
        )
        excess = len(self._pairs) - self._max_pairs
        doomed = [p.key for p in removable[:excess]]
        self.counters[Event.PAIRS_PRUNED] += len(doomed)
        self._remove_pairs(doomed, now)

    def _remove_pairs(self, keys: Iterable[tuple[Address, Address]], now: float) -> None:
        removed_selected = False
        for key in keys:
            pair = self._pairs.pop(key, None)
            if pair is None:
                continue
            for tid in pair.transactions:
                self._transactions.pop(tid, None)
            if pair is self._selected:
                removed_selected = True
        if removed_selected or self.state != "disconnected":
            self._reselect(now, removed=removed_selected)

    def _send_check(self, pair: _Pair, now: float) -> None:
        assert self.remote_credentials is not None and self._remote_key is not None
        request = new_request(Method.BINDING, self._rng)
        request.add_str(Attr.USERNAME,
                        f"{self.remote_credentials.ufrag}:{self.local_credentials.ufrag}")
        request.add_u32(Attr.PRIORITY, prflx_priority(pair.local.priority))
        if self.controlling:
            request.add_u64(Attr.ICE_CONTROLLING, self._tie_breaker)
            if pair.use_candidate:
                request.add(Attr.USE_CANDIDATE, b"")
        else:
            request.add_u64(Attr.ICE_CONTROLLED, self._tie_breaker)
        payload = encode(request, integrity_key=self._remote_key, fingerprint=True)
        tid = request.transaction_id
        self._transactions[tid] = _Transaction(pair.key, pair.use_candidate, self.controlling)
        pair.transactions.append(tid)
        if len(pair.transactions) > _TRANSACTIONS_PER_PAIR:
            self._transactions.pop(pair.transactions.popleft(), None)
        if pair.state is PairState.WAITING:
            pair.state = PairState.IN_PROGRESS
        pair.last_sent = now
        pair.unanswered += 1
        pair.due = now + self._delay_after(pair)
        self._transmits.append(Transmit(_base(pair.local), pair.remote.address, payload))

    def _delay_after(self, pair: _Pair) -> float:
        if pair.unanswered == 0:
            return self._timings.max_rto
        return self._timings.rto(pair.unanswered)

    def _forget_transaction(self, pair: _Pair, tid: bytes) -> None:
        self._transactions.pop(tid, None)
        if tid in pair.transactions:
            pair.transactions.remove(tid)

    def _fail(self, pair: _Pair, now: float, *, reselect: bool = True) -> None:
        logger.debug("pair %r failed", pair)
        pair.state = PairState.FAILED
        pair.due = None
        pair.use_candidate = False
        for tid in pair.transactions:
            self._transactions.pop(tid, None)
        pair.transactions.clear()
        self.counters[Event.PAIR_FAILED] += 1
        if reselect:
            self._reselect(now)

    def _local_for_base(self, base: Address) -> Candidate | None:
        found: Candidate | None = None
        for c in self._local_candidates:
            if c.kind != "srflx" and _base(c) == base and (found is None
                                                           or c.priority > found.priority):
                found = c
        return found

    def _remote_at(self, addr: Address) -> Candidate | None:
        for c in self._remote_candidates:
            if c.address == addr:
                return c
        return None

    def _remember_peer(self, addr: Address) -> None:
        if addr in self._seen_from:
            return
        if len(self._seen_from) >= _MAX_SEEN_FROM:
            self.counters[Drop.SEEN_FROM_FULL] += 1
            return
        self._seen_from.add(addr)

    def _drop(self, reason: str, src: Address, detail: str = "") -> None:
        self.counters[reason] += 1
        logger.debug("dropped STUN from %s: %s %s", src, reason, detail)

    def _nomination_deadline(self) -> float | None:
        if not self.controlling or self._first_success is None or self._nominating():
            return None
        if not any(p.state is PairState.SUCCEEDED for p in self._pairs.values()):
            return None
        return self._first_success + NOMINATION_WAIT

    def _nominating(self) -> bool:
        return any((p.use_candidate or p.nominated) and p.state is not PairState.FAILED
                   for p in self._pairs.values())

    def _maybe_nominate(self, now: float) -> None:
        """Regular nomination (RFC 8445 §8.1.1) by the controlling side."""
        if not self.controlling or self._nominating():
            return
        succeeded = [p for p in self._pairs.values() if p.state is PairState.SUCCEEDED]
        if not succeeded:
            return
        best = max(succeeded, key=lambda p: p.priority)
        better_pending = any(
            p.priority > best.priority and p.state in (PairState.WAITING, PairState.IN_PROGRESS)
            for p in self._pairs.values()
        )
        deadline = self._nomination_deadline()
        if better_pending and deadline is not None and now < deadline:
            return
        logger.debug("nominating %r", best)
        best.use_candidate = True
        best.due = now

    def _probe_selected(self, nominated: _Pair, now: float) -> None:
        """The peer nominates another pair: check at once that the selected one still works.

        A roaming peer (new address, same credentials) nominates a new pair while our
        selected pair still looks alive for up to ~10 s (minutes when idle). A triggered
        check on the selected pair finds out in two RTOs instead; ``_reselect`` then prefers
        the healthy pair. If a check on the selected pair is already overdue (sent at least
        the default initial RTO ago, also while idle timings space them 60 s apart), the
        probe is its second unanswered check and the switch is immediate: 1.4 switches the
        socket on a new nomination (rust/connlib/snownet/src/node.rs).
        """
        selected = self._selected
        if (
            selected is None
            or selected is nominated
            or (
                selected.last_sent is not None
                and now - selected.last_sent < DEFAULT_TIMINGS.initial_rto
            )
        ):
            return
        selected.due = now

    def _reselect(self, now: float, *, removed: bool = False) -> None:
        """Pick the pair data should use; emit Nominated / Disconnected on changes.

        Among nominated pairs the highest priority wins, but a pair whose last two checks
        went unanswered yields to a nominated pair that still answers (fast fail-over).
        """
        live = [p for p in self._pairs.values() if p.state is PairState.SUCCEEDED]
        nominated = [p for p in live if p.nominated]
        best: _Pair | None = None
        if nominated:
            healthy = [p for p in nominated if p.unanswered < SILENT_AFTER_CHECKS]
            best = max(healthy or nominated, key=lambda p: p.priority)
        elif self.state == "connected" and live:
            # The selected path died: fall back to a path that still answers; the
            # controlling side nominates it, the controlled side waits for that.
            best = max(live, key=lambda p: p.priority)
            if self.controlling:
                best.use_candidate = True
                best.due = now
        if best is not None:
            if best is not self._selected:
                self._selected = best
                self.state = "connected"
                logger.debug("selected %r", best)
                self._events.append(Nominated(best.local, best.remote.address))
            return
        self._selected = None
        if self.state == "connected":
            self._disconnect("no usable candidate pair left" if not removed
                             else "the selected candidate pair was removed")
        elif self.state == "checking" and self._pairs and all(
            p.state is PairState.FAILED for p in self._pairs.values()
        ):
            self._disconnect("all candidate pairs failed")

    def _disconnect(self, reason: str) -> None:
        self.state = "disconnected"
        logger.debug("ICE disconnected: %s", reason)
        self._events.append(Disconnected(reason))

