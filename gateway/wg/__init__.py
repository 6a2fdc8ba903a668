"""WireGuard, sans-IO: keys, Noise_IKpsk2 handshakes, cookies, replay window and the tunnel.

Import the pieces from their modules (``gateway.wg.tunnel.Tunnel`` and friends).
"""
