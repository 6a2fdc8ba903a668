"""``python -m devportal --config config/devportal.yaml``: run the development portal."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from devportal.config import ConfigError, load_config
from devportal.server import DevPortal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devportal", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML configuration file")
    parser.add_argument("--host", help="override listen.host")
    parser.add_argument("--port", type=int, help="override listen.port")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"devportal: {exc}", file=sys.stderr)
        return 2
    if args.host or args.port is not None:
        from dataclasses import replace

        config = replace(
            config,
            host=args.host or config.host,
            port=args.port if args.port is not None else config.port,
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    portal = DevPortal(config).start()
    print(f"devportal listening on {portal.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        portal.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
