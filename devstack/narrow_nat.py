"""Test only: the gateway with a narrow DNS-resource NAT port range.

``python -m devstack.narrow_nat LOW HIGH run ...`` is ``python -m actors.cli run ...``
with every client's NAT choosing ports from LOW-HIGH only, so an end-to-end test can
exhaust a real address's ports with a handful of flows instead of 65,535.
"""

from __future__ import annotations

import sys

from actors.cli import main
from actors.peer_session import PeerSession

if __name__ == "__main__":
    PeerSession.nat_ports = (int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
