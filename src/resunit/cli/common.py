"""What every command shares: one-line errors, JSON output and plain-text tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from resunit.errors import ResunitError

USAGE_ERROR = 2


def run_command(
    handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
) -> int:
    """Run a command handler; a ``ResunitError`` becomes one line on stderr and exit code 2."""
    try:
        return handler(args) or 0
    except ResunitError as exc:
        print(f"resunit: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("resunit: interrupted", file=sys.stderr)
        return 130


def print_json(payload: Any) -> None:
    """Write ``payload`` as indented JSON to stdout (for scripts: ``--json``)."""
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A plain-text table; ``align`` has one letter per column, ``l`` or ``r`` (default l)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align.ljust(len(headers), "l")

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def add_json_flag(parser: argparse.ArgumentParser, instead_of: str = "a table") -> None:
    parser.add_argument(
        "--json", action="store_true", help=f"print machine-readable JSON instead of {instead_of}"
    )
