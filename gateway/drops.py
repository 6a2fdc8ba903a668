"""The names the gateway counts drops and node events under: one vocabulary for the cores,
``status`` (``firezone-gateway status``) and ``/metrics``.

A :class:`Drop` is why one packet, datagram or message was discarded; an :class:`Event` is
something a node counts that is not a drop. Both are ``StrEnum``s, so a member *is* its
string: ``counters[Drop.NOT_ALLOWED]`` and ``counters["not_allowed"]`` are the same key,
the JSON of ``status`` and the ``reason``/``event`` labels of ``/metrics`` show the plain
string, and the strings never change (dashboards and tests use them).

A few names carry a number or a method chosen at run time (an errno, a STUN error code);
they are a fixed prefix (:data:`DROP_PREFIXES`, :data:`EVENT_PREFIXES`) plus that suffix,
bounded by the set of errnos, codes and methods. :func:`is_known` accepts exactly these
names; ``tests/unit/test_drops.py`` checks that every name counted in ``gateway/`` and
``actors/`` is one.
"""

from __future__ import annotations

from enum import StrEnum, unique

__all__ = ["DROP_PREFIXES", "EVENT_PREFIXES", "Drop", "Event", "is_known"]


@unique
class Drop(StrEnum):
    """Why an input was discarded (the ``reason`` label of ``firezone_dropped_packets_total``
    for a client's data path, the ``event`` label of ``firezone_node_events_total`` for the
    node's)."""

    # -- WireGuard (gateway/wg/tunnel.py, gateway/wg/noise.py) --
    TOO_SHORT = "too_short"  # shorter than the WireGuard message it claims to be
    UNKNOWN_TYPE = "unknown_type"  # first byte is no WireGuard message type
    BAD_SIZE = "bad_size"  # a handshake message of the wrong length
    BAD_MAC1 = "bad_mac1"  # mac1 does not verify: not addressed to our key
    UNDER_LOAD = "under_load"  # handshake without a valid cookie (mac2) while under load
    NOT_FOR_US = "not_for_us"  # handshake initiation encrypted to another static key
    WRONG_PEER = "wrong_peer"  # initiation from a static key other than the client's
    LOW_ORDER_POINT = "low_order_point"  # an ephemeral key of small order (no shared secret)
    TIMESTAMP_REPLAY = "timestamp_replay"  # initiation whose TAI64N timestamp is not newer
    UNKNOWN_INDEX = "unknown_index"  # receiver index of no session of ours
    EXPIRED_SESSION = "expired_session"  # transport data for a session past its lifetime
    DECRYPT_FAILED = "decrypt_failed"  # AEAD open failed (forged or corrupted)
    REPLAY = "replay"  # transport counter already seen or left of the window
    BAD_COOKIE = "bad_cookie"  # cookie reply that does not decrypt
    NOT_IP = "not_ip"  # decrypted payload (or TUN read) is not IPv4/IPv6
    BAD_IP_LENGTH = "bad_ip_length"  # IP total length beyond the decrypted payload
    QUEUE_OVERFLOW = "queue_overflow"  # the oldest packet waiting for a handshake, queue full

    # -- Client data path, packet filter and NAT (gateway/peer.py) --
    MALFORMED = "malformed"  # does not parse (IP from a client; STUN; TURN response)
    SPOOFED_SOURCE = "spoofed_source"  # source is not the client's tunnel address
    NOT_ALLOWED = "not_allowed"  # the filter of no authorized resource allows it
    UNKNOWN_PROTOCOL = "unknown_protocol"  # an IP protocol the DNS-resource NAT cannot map
    NAT_FAILED = "nat_failed"  # the forward translation (NAT or NAT46/64) failed
    NAT_EXHAUSTED = "nat_exhausted"  # no free NAT port for a new flow
    NAT_SESSIONS_LIMIT = "nat_sessions_limit"  # the client's NAT session bound is reached
    P2P_IGNORED = "p2p_ignored"  # a p2p control message the gateway does not act on
    P2P_INACTIVE = "p2p_inactive"  # AssignedIps for no authorized DNS resource (answered inactive)
    OUTBOUND_MALFORMED = "outbound_malformed"  # a packet from the TUN that does not parse
    OUTBOUND_NAT_FAILED = "outbound_nat_failed"  # the reverse translation failed
    ICMP_ERROR_NAT46_UNTRANSLATED = "icmp_error_nat46_untranslated"  # quote left untranslated
    DNS_RESOLUTIONS_LIMIT = "dns_resolutions_limit"  # too many DNS lookups in flight
    DNS_DOMAINS_LIMIT = "dns_domains_limit"  # the client's bound on DNS domains is reached
    DNS_TRANSLATIONS_LIMIT = "dns_translations_limit"  # the client's proxy-IP bound is reached
    PROXY_IP_OUT_OF_RANGE = "proxy_ip_out_of_range"  # a proxy IP outside the DNS ranges
    DNS_SETUP_FAILED = "dns_setup_failed"  # translations for a resolved domain not set up
    RESOURCE_TYPE_CHANGE_REFUSED = "resource_type_change_refused"  # a resource changed its type

    # -- Client session shell (actors/peer_session.py) --
    CLOSED = "closed"  # input for a session (or TUN device) already closed
    NO_SESSION = "no_session"  # datagrams for a client with no WireGuard session yet
    NO_CLIENT_STATE = "no_client_state"  # decrypted packets before the client has state
    TUN_NO_SESSION = "tun_no_session"  # TUN packets for a client with no session
    PENDING_FULL = "pending_full"  # the packets held during a handshake overflowed

    # -- TUN device (actors/tun.py; shown in /metrics as tun_<reason>) --
    NOT_PEER_RANGE = "not_peer_range"  # TUN packet to an address outside the client ranges
    NO_CLIENT = "no_client"  # TUN packet to a client address no client holds
    PEER_ERROR = "peer_error"  # the client's data path raised on a batch (a bug; logged)
    WRITE_ERROR = "write_error"  # the device refused a write
    KERNEL = "kernel"  # the kernel's queue towards our reads was full

    # -- ICE (gateway/ice/agent.py) --
    NOT_BINDING = "not_binding"  # a STUN message of a method other than BINDING
    INDICATION = "indication"  # a BINDING indication (nothing to answer)
    REQUEST_UNAUTHENTICATED = "request_unauthenticated"  # wrong ICE username or integrity
    REQUEST_ON_UNKNOWN_LOCAL = "request_on_unknown_local"  # check to an address we don't hold
    REQUEST_WITHOUT_PRIORITY = "request_without_priority"  # check without PRIORITY
    FAMILY_MISMATCH = "family_mismatch"  # check between IPv4 and IPv6
    REMOTE_CANDIDATES_FULL = "remote_candidates_full"  # peer-reflexive beyond the bound
    REMOTE_CANDIDATE_REJECTED = "remote_candidate_rejected"  # unusable remote candidate
    LOCAL_CANDIDATE_REJECTED = "local_candidate_rejected"  # unusable local candidate
    RESPONSE_UNKNOWN_TRANSACTION = "response_unknown_transaction"  # response to no check
    RESPONSE_BAD_INTEGRITY = "response_bad_integrity"  # response failing MESSAGE-INTEGRITY
    RESPONSE_FOR_REMOVED_PAIR = "response_for_removed_pair"  # its pair was pruned meanwhile
    RESPONSE_NOT_SYMMETRIC = "response_not_symmetric"  # from another address than asked
    SEEN_FROM_FULL = "seen_from_full"  # a new source address beyond the agent's bound

    # -- TURN client (gateway/turn/allocation.py) --
    OVERSIZED = "oversized"  # response (or UDP datagram) over the size bound
    FREED = "freed"  # response for an allocation already freed
    NOT_A_RESPONSE = "not_a_response"  # a request or indication from the relay
    UNKNOWN_TRANSACTION = "unknown_transaction"  # response to no request of ours
    WRONG_SOURCE = "wrong_source"  # response from another address than the relay's
    METHOD_MISMATCH = "method_mismatch"  # response method differs from the request's
    INTEGRITY_FAILED = "integrity_failed"  # MESSAGE-INTEGRITY does not verify
    MISSING_INTEGRITY = "missing_integrity"  # success response without MESSAGE-INTEGRITY
    ALLOCATE_SUCCESS_INCOMPLETE = "allocate_success_incomplete"  # missing relayed address
    REFRESH_SUCCESS_WITHOUT_LIFETIME = "refresh_success_without_lifetime"  # no LIFETIME
    CHANNEL_BIND_FOR_FORGOTTEN_CHANNEL = "channel_bind_for_forgotten_channel"  # late answer
    WRONG_REALM = "wrong_realm"  # a 401 challenge for another realm
    CHALLENGE_WITHOUT_NONCE = "challenge_without_nonce"  # a 401/438 without NONCE
    MALFORMED_CHANNEL_DATA = "malformed_channel_data"  # ChannelData that does not parse
    UNKNOWN_CHANNEL = "unknown_channel"  # ChannelData on a channel not bound
    NO_RELAY_FOR_FAMILY = "no_relay_for_family"  # no relayed address of the peer's family
    NO_CHANNEL = "no_channel"  # no channel bound (yet) towards the peer
    CHANNELS_EXHAUSTED = "channels_exhausted"  # every channel number is in use

    # -- Node (gateway/node.py, actors/node.py) --
    OVERSIZED_DATAGRAM = "oversized_datagram"  # a UDP datagram over the size bound
    GARBAGE_DATAGRAM = "garbage_datagram"  # neither STUN, ChannelData nor WireGuard
    CHANNEL_DATA_DROPPED = "channel_data_dropped"  # ChannelData no allocation accepts
    WIREGUARD_NO_CONNECTION = "wireguard_no_connection"  # WireGuard for no connection
    MALFORMED_STUN = "malformed_stun"  # STUN from a client that does not parse
    MALFORMED_STUN_FROM_RELAY = "malformed_stun_from_relay"  # STUN from a relay, unparsed
    STUN_FROM_DELETED_RELAY = "stun_from_deleted_relay"  # a relay already removed
    STUN_NO_AGENT = "stun_no_agent"  # STUN that no connection's agent claims
    CANDIDATES_FOR_UNKNOWN_CLIENT = "candidates_for_unknown_client"  # no such connection
    CANDIDATES_AFTER_NOMINATION = "candidates_after_nomination"  # a pair is nominated
    REMOTE_CANDIDATES_OVER_LIMIT = "remote_candidates_over_limit"  # lines beyond the bound
    INVALIDATIONS_OVER_LIMIT = "invalidations_over_limit"  # lines beyond the bound
    BAD_REMOTE_CANDIDATE = "bad_remote_candidate"  # a candidate line that does not parse
    BAD_LOCAL_ADDRESS = "bad_local_address"  # a local address unusable as a candidate
    INVALID_HOST_CANDIDATE = "invalid_host_candidate"  # a host candidate refused
    CHANNEL_REFUSED_CONNECTION_BUDGET = "channel_refused_connection_budget"  # per connection
    CHANNEL_REFUSED_RELAY_BUDGET = "channel_refused_relay_budget"  # per relay
    HANDSHAKE_NO_PEER = "handshake_no_peer"  # a handshake for a client with no session
    HANDSHAKE_PEER_BUSY = "handshake_peer_busy"  # the session's queue refused it
    NODE_QUEUE_DROP = "node_queue_drop"  # the node actor's step queue overflowed

    # -- UDP sockets (actors/io/udp.py) --
    SEND_NO_SOCKET = "send_no_socket"  # no socket of the datagram's family
    SEND_SOURCE_REFUSED = "send_source_refused"  # the source address is no longer ours
    SEND_WOULD_BLOCK = "send_would_block"  # the socket's send buffer was full
    READER_ERROR = "reader_error"  # the reader's dispatch raised (a bug; logged)
    PEER_GONE = "peer_gone"  # datagrams for a session that just closed


@unique
class Event(StrEnum):
    """A node counter that is not a drop (``firezone_node_events_total``)."""

    ATTRIBUTES_REJECTED = "attributes_rejected"  # TURN request resent without refused attrs
    RESETS = "resets"  # resets: new key, every connection dropped
    CONNECTIONS_CREATED = "connections_created"  # connections set up
    CONNECTIONS_FAILED = "connections_failed"  # connections that failed (ICE, WireGuard)
    NO_TURN_SERVERS = "no_turn_servers"  # a connection set up with no relay to use
    PAIRS_PRUNED = "pairs_pruned"  # candidate pairs removed by the agent's bound
    PAIR_FAILED = "pair_failed"  # candidate pairs whose checks went unanswered
    ROLE_CONFLICT = "role_conflict"  # ICE role conflicts resolved
    GRO_TRAINS = "gro_trains"  # UDP reads that carried a GRO train of datagrams
    TIMER_STEP_FAILED = "timer_step_failed"  # a node timer step raised (retried)


#: Drop names with a run-time suffix: ICE error responses by STUN error code, UDP send and
#: receive errors by errno.
DROP_PREFIXES: tuple[str, ...] = ("error_response_", "send_error_", "recv_error_")

#: Event names with a run-time suffix: TURN error responses by code, TURN requests that
#: timed out by method (allocate, refresh, channelbind, ...).
EVENT_PREFIXES: tuple[str, ...] = ("error_", "timeout_")

_NAMES = frozenset(Drop) | frozenset(Event)


def is_known(name: str) -> bool:
    """Whether ``name`` is a counter name of this vocabulary (a member or prefix + suffix)."""
    return name in _NAMES or any(
        name.startswith(prefix) and len(name) > len(prefix)
        for prefix in DROP_PREFIXES + EVENT_PREFIXES
    )
