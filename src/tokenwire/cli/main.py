"""``tokenwire`` console script: dispatches to the subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tokenwire.cli import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenwire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    for name in ("chat", "bench"):
        try:
            module = __import__(f"tokenwire.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(commands)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
