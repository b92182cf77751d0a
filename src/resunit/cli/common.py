"""What every command shares: one-line errors, JSON output and plain-text tables."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from resunit.errors import ConfigError, ResunitError
from resunit.outputs import json_text

USAGE_ERROR = 2
# What a shell reports for a process killed by SIGPIPE; the reader (`| head`) went away.
BROKEN_PIPE = 128 + 13


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, like every other error.

    argparse's default prints the whole usage block first; the line below names the command
    and points at its ``--help`` instead, so the error itself is what the user sees.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(
    handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
) -> int:
    """Run a command handler; a ``ResunitError`` becomes one line on stderr and exit code 2."""
    try:
        return handler(args) or 0
    except ResunitError as exc:
        print(f"resunit: error: {_rank_label()}{exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("resunit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader has all it wanted. Point stdout
        # at /dev/null so the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


def _rank_label() -> str:
    """``[rank 1 of 4] `` under torchrun, else nothing: every rank meets the same bad input and
    prints its own line, and an error only some ranks meet (a file missing on one machine)
    must say which."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.isdigit() and int(world_size) > 1:
        return f"[rank {os.environ.get('RANK', '?')} of {world_size}] "
    return ""


def print_json(payload: Any) -> None:
    """Write ``payload`` as indented strict JSON to stdout (for scripts: ``--json``); a NaN
    or infinity is ``null`` (see :func:`resunit.outputs.json_text`)."""
    sys.stdout.write(json_text(payload, indent=2, default=str) + "\n")


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
    """Give a command the shared ``--json`` flag (results as JSON on stdout, for scripts)."""
    parser.add_argument(
        "--json", action="store_true", help=f"print machine-readable JSON instead of {instead_of}"
    )


def comma_separated(text: str, option: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an empty item (``"1,,2"``) or a repeated one is a usage
    error rather than something silently dropped or done twice."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigError(
            f"{option} takes a comma-separated list with no empty items, got {text!r}"
        )
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"{option} names {', '.join(repeated)} more than once")
    return items
