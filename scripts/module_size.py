"""Fail when a Python module in src/ is over the line limit (issue 15: one concept a module).

    python scripts/module_size.py [--max 600] [ROOT ...]

A module that outgrows the limit holds more than one thing: split it by concept (a package
or sibling modules), as docs/development.md says. ``make lint`` runs this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def oversized(roots: list[Path], limit: int) -> list[tuple[Path, int]]:
    """The modules under ``roots`` with more than ``limit`` lines, longest first."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > limit:
                found.append((path, lines))
    return sorted(found, key=lambda item: -item[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=600, help="lines a module may have (600)")
    parser.add_argument("roots", nargs="*", type=Path, default=[Path("src")])
    args = parser.parse_args()
    found = oversized(args.roots, args.max)
    for path, lines in found:
        print(f"{path}: {lines} lines (at most {args.max}): split it by concept", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
