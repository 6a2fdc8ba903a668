"""Sans-IO protocol cores of pyfz-gateway.

Nothing under this package performs IO, starts threads or reads clocks: callers pass
bytes, ``now`` (monotonic seconds, float) and ``unix_now`` (wall-clock seconds) in, and
poll datagrams, events and the next deadline out. ``tests/test_purity.py`` enforces it.
"""

__version__ = "0.1.0"

#: The Firezone gateway version we are compatible with. The portal parses it out of the
#: ``connlib/<version>`` User-Agent token and routes >= 1.4 clients only to >= 1.4.0.
COMPATIBLE_FIREZONE_VERSION = "1.4.0"
