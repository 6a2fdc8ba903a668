"""The portal connection: login URL, Phoenix channel core and the gateway messages.

Sans-IO like the rest of :mod:`gateway`; the websocket itself lives in ``actors``.
"""
