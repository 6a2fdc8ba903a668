"""A development Firezone client built from the gateway's own sans-IO cores.

It exists for end-to-end tests, the demo and benchmarks: it joins the development portal,
asks for resources, connects to the gateway (ICE controlling, WireGuard initiator) and
moves packets between a TUN device and the tunnel. ``core`` holds the protocol logic
(no IO); ``client`` is the single-threaded IO loop around it.
"""
