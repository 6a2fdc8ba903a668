"""``firezone-gateway`` command line entry point (placeholder until the operations issue)."""

from __future__ import annotations

import argparse
import sys

from gateway import COMPATIBLE_FIREZONE_VERSION, __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="firezone-gateway",
        description="A Firezone-compatible gateway written in Python.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"firezone-gateway {__version__} (compatible with {COMPATIBLE_FIREZONE_VERSION})",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
