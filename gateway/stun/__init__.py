"""STUN (RFC 8489/5389) message codec."""
