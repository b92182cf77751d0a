"""``resunit models``: the table of registered architectures."""

from __future__ import annotations

import argparse

from resunit.cli.common import add_json_flag, format_table, print_json
from resunit.models import get_model_spec, list_models, model_parameter_count


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the registered models with their parameter counts",
        description="List every registered architecture with its family and parameter count "
        "(for its default number of classes: 1000 for ImageNet models, 10 for CIFAR ones).",
    )
    parser.add_argument("--family", help="only this family (imagenet, cifar, cifar-plain, …)")
    add_json_flag(parser)
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models(args.family):
        spec = get_model_spec(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "parameters": model_parameter_count(name),
                "description": spec.description,
            }
        )
    if args.json:
        print_json(rows)
        return 0
    table = [(r["name"], r["family"], f"{r['parameters']:,}", r["description"]) for r in rows]
    print(format_table(["model", "family", "parameters", "description"], table, align="llr"))
    return 0
