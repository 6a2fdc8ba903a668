"""Thin Pykka shells around the sans-IO cores in :mod:`gateway`.

Each actor owns one IO resource (a socket, the TUN fd, the websocket), feeds what arrives
into its core and carries out what the core asks for. No protocol decisions live here.
"""
