"""IP packet handling for the data plane: views, checksums, filters, NAT, p2p control.

Everything here works on plain ``bytes`` and is pure (no IO, no clocks).
"""
