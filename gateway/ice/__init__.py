"""ICE (RFC 8445, trickle RFC 8838, consent RFC 7675): candidates and the sans-IO agent."""
