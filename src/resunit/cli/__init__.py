"""The ``resunit`` command: argument parsing and printing only; the library does the work.

Each command group lives in its own module with a ``register(subparsers)`` function that
adds its sub-commands and points each at a ``run(args) -> int`` handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resunit import __version__
from resunit.cli import deploy, inspect, train, zoo
from resunit.cli.common import OneLineErrorParser, run_command

COMMAND_MODULES = [zoo, train, deploy, inspect]


def build_parser() -> argparse.ArgumentParser:
    """The ``resunit`` parser with every command group's sub-commands registered."""
    parser = OneLineErrorParser(
        prog="resunit",
        description=(
            "Residual networks in PyTorch: build them, train them on real images, "
            "look inside them and run them fast. Run `resunit COMMAND --help` for details."
        ),
    )
    parser.add_argument("--version", action="version", version=f"resunit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resunit`` console script; returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Name the command's own --help: that is where the options it takes are listed.
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)  # a usage error: stdout stays for results
        return 2
    return run_command(args.handler, args)


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The innermost sub-command's parser that ``args`` reached (``resunit data download``)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, sub.dest, None) if sub is not None else None
        if sub is None or chosen not in sub.choices:
            return parser
        parser = sub.choices[chosen]


if __name__ == "__main__":
    sys.exit(main())
