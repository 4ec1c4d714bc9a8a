"""``keyfence``: the service's own commands (demo now; daemon, mount, ... later)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyfence", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the seed scenario: write, log out, data survives")
    demo.add_argument(
        "--emergency", action="store_true", help="wipe at once and report what was dropped"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from keyfence.cli import demo as demo_module

        return demo_module.run(emergency=args.emergency)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
