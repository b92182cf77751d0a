"""``resunit inspect``, ``analyze``, ``experiment`` and ``report``: parsing and printing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from resunit.analysis import shape_text
from resunit.blocks import SHORTCUT_KINDS
from resunit.cli.common import add_json_flag, format_table, print_json
from resunit.data import DATASETS
from resunit.errors import ConfigError
from resunit.train_config import RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_inspect(subparsers)
    _register_analyze(subparsers)
    _register_experiment(subparsers)
    _register_report(subparsers)


_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _count(n: int, sep: str = "") -> str:
    """1234567 → '1.23M': short enough for a table, exact values are in --json.

    From G up, three decimals, as torchvision's table of GFLOPS (1.814 for resnet18).
    """
    for limit, suffix in _PREFIXES:
        if abs(n) >= limit:
            decimals = 3 if limit >= 1e9 else 2
            return f"{n / limit:.{decimals}f}{sep}{suffix}"
    return str(n)


# --- inspect --------------------------------------------------------------------------------


def _register_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="shapes, shortcuts, parameters and MACs of every residual unit",
        description="One row per residual unit: input → output shape, the shortcut it uses and "
        "why, parameters and multiply-accumulates (MACs, counted by torch.utils.flop_counter) "
        "of its residual branch and of its shortcut, then the totals. MODEL is a registered "
        "name (`resunit models`) or a checkpoint written by `resunit train`. "
        "`resunit inspect block --in 64 --out-channels 128 --stride 2 --size 56` walks one "
        "unit layer by layer instead; the options of that group apply to it only.",
    )
    p.add_argument("model", metavar="MODEL", help="registered model, checkpoint path, or 'block'")
    p.add_argument(
        "--input",
        metavar="C×H×W",
        help="input shape of a model, e.g. 3x224x224 (default: 224×224 for ImageNet models, "
        "32×32 for CIFAR ones, the training size for a checkpoint); a block takes --in and "
        "--size instead",
    )
    # Defaults are None so that run_inspect can tell a given option from an absent one and
    # refuse them for a whole model instead of ignoring them; _BLOCK_OPTIONS has the defaults.
    g = p.add_argument_group("inspect block (one unit only)")
    g.add_argument("--in", dest="in_channels", type=int, help="input channels (default 64)")
    g.add_argument(
        "--out-channels", dest="out_channels", type=int, help="output channels (default 128)"
    )
    # The old spelling, kept working but out of --help: elsewhere --out is a directory.
    g.add_argument("--out", dest="out_channels", type=int, help=argparse.SUPPRESS)
    g.add_argument("--stride", type=int, help="stride of the unit (default 2)")
    g.add_argument("--size", type=int, help="input height and width (default 56)")
    g.add_argument(
        "--block", help="basic, bottleneck, preact_basic or preact_bottleneck (default basic)"
    )
    g.add_argument(
        "--shortcut",
        help=f"{', '.join(SHORTCUT_KINDS)} (or the paper's A/B/C; default auto: the identity "
        "where shapes match, a projection where they change)",
    )
    add_json_flag(p)
    p.set_defaults(handler=run_inspect)


# The unit-only options: flag and default of each, by argparse dest.
_BLOCK_OPTIONS = {
    "in_channels": ("--in", 64),
    "out_channels": ("--out-channels", 128),
    "stride": ("--stride", 2),
    "size": ("--size", 56),
    "block": ("--block", "basic"),
    "shortcut": ("--shortcut", "auto"),
}


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from resunit.analysis import inspect_model, inspect_unit, make_unit, parse_input_shape

    given = [flag for dest, (flag, _) in _BLOCK_OPTIONS.items() if getattr(args, dest) is not None]
    if args.model == "block":
        if args.input:
            raise ConfigError(
                "--input applies to a model; for one unit give --in (channels) and --size"
            )
        o = {d: default if getattr(args, d) is None else getattr(args, d)
             for d, (_, default) in _BLOCK_OPTIONS.items()}  # fmt: skip
        with torch.device("meta"):
            unit = make_unit(
                o["in_channels"], o["out_channels"], o["stride"], o["block"], o["shortcut"]
            )
        result = inspect_unit(unit, o["size"])
        if args.json:
            print_json(result)
        else:
            _print_unit(result)
        return 0
    if given:
        raise ConfigError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a single unit "
            f"(`resunit inspect block`), not to {args.model}; for a model use --input"
        )
    shape = parse_input_shape(args.input) if args.input else None
    model, shape, title = _build_for_inspection(args.model, shape)
    result = inspect_model(model, shape)
    result["model"] = title
    if args.json:
        print_json(result)
    else:
        _print_model(result)
    return 0


def _build_for_inspection(
    name: str, shape: tuple[int, int, int] | None
) -> tuple[Any, tuple[int, int, int] | None, str]:
    import torch

    from resunit.checkpoint import load_model, read_checkpoint
    from resunit.models import create_model, list_models

    # A registered name means the model, even beside a file of that name (./resnet56 is the
    # file); anything else that exists, or ends in .pt/.pth, is a checkpoint.
    registered = name in list_models()
    if not registered and (Path(name).suffix in (".pt", ".pth") or Path(name).is_file()):
        model, config = load_model(name)
        if shape is None:
            size = int(config.get("input_size") or 32)
            shape = (model.in_chans, size, size)
        return model, shape, f"{config['model']} ({name})"
    if not registered and Path(name).is_dir():  # a run directory, most likely
        read_checkpoint(name)  # refuses a directory, naming the checkpoint file to give instead
    # Built on the meta device: no memory and no time, even for resnet1202 or wrn_28_10.
    with torch.device("meta"):
        model = create_model(name, in_chans=shape[0] if shape else None)
    return model, shape, name


def _print_model(result: dict[str, Any]) -> None:
    rows = []
    for r in result["units"]:
        rows.append(
            (
                r["name"],
                f"{shape_text(r['input_shape'])} → {shape_text(r['output_shape'])}",
                r["shortcut_reason"] or "-",
                _count(r["residual_params"]),
                _count(r["residual_macs"]),
                _count(r["shortcut_params"]) if r["shortcut"] else "-",
                _count(r["shortcut_macs"]) if r["shortcut"] else "-",
            )
        )
    headers = ["unit", "shape", "shortcut (why)", "F params", "F MACs", "sc params", "sc MACs"]
    print(f"{result['model']} on {shape_text(result['input'])} input")
    print(format_table(headers, rows, align="lllrrrr"))
    print(
        f"total: {result['total_parameters']:,} parameters, {result['total_macs']:,} MACs "
        f"({_count(result['total_macs'], ' ')}) per image"
    )


def _print_unit(result: dict[str, Any]) -> None:
    shapes = f"{shape_text(result['input_shape'])} → {shape_text(result['output_shape'])}"
    print(f"{result['block']}: {shapes}; shortcut {result['shortcut_reason']}")
    rows = [
        (
            s["branch"],
            s["layer"],
            s["module"],
            f"{shape_text(s['input_shape'])} → {shape_text(s['output_shape'])}",
            f"{s['params']:,}",
            f"{s['macs']:,}",
        )
        for s in result["steps"]
    ]
    print(format_table(["branch", "layer", "operation", "shape", "params", "MACs"], rows,
                       align="llllrr"))  # fmt: skip
    print(f"total: {result['total_parameters']:,} parameters, {result['total_macs']:,} MACs")


# --- analyze --------------------------------------------------------------------------------


def _register_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="residual ratios, lesion study and gradient flow of a trained model",
        description="For a trained checkpoint on real test images: the residual ratio "
        "‖F(x)‖/‖x‖ and the spread of F(x) per unit (He et al. 2015, Fig. 7); test accuracy "
        "with each unit's residual branch removed, y = relu(shortcut(x)) (Veit et al. "
        "2016); and the gradient norm per layer at initialisation for the architecture and "
        "its plain counterpart. Writes analysis.json and one PNG per analysis.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pt from resunit train")
    p.add_argument(
        "--data", choices=DATASETS, help="dataset (default: the one the checkpoint was trained on)"
    )
    p.add_argument("--data-root", help="directory holding the dataset (CIFAR, imagefolder)")
    p.add_argument("--limit", type=int, help="use only the first N test images (faster)")
    p.add_argument(
        "--batch-size", type=int, default=500, help="evaluation batch size (default: 500)"
    )
    p.add_argument(
        "--out", help="directory for analysis.json and plots (default: CHECKPOINT_DIR/analysis)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_json_flag(p)
    p.set_defaults(handler=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from resunit.analysis import analyze_checkpoint

    out = args.out or str(Path(args.checkpoint).parent / "analysis")
    result = analyze_checkpoint(
        args.checkpoint,
        data=args.data,
        data_root=args.data_root,
        limit=args.limit,
        batch_size=args.batch_size,
        out_dir=out,
        plots=not args.no_plots,
    )
    if args.json:
        print_json(result)
        return 0
    _print_analysis(result)
    print(f"\nwrote {Path(out) / 'analysis.json'}" + "".join(
        f", {p}" for p in result["plots"].values()))  # fmt: skip
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _print_analysis(result: dict[str, Any]) -> None:
    lesion = {r["name"]: r for r in result["lesion"]["units"]}
    flow = result["gradient_flow"]
    print(f"{result['model']} on {result['test_images']} {result['data']} test images")
    rows = []
    for r in result["residual_ratios"]:
        cut = lesion[r["name"]]
        # A drop is positive when the lesion costs accuracy (negative: it helped).
        drop = "n/a" if cut["drop"] is None else f"{100 * cut['drop']:.2f}"
        rows.append(
            (
                r["name"],
                r["shortcut"],
                f"{r['residual_ratio']:.3f}",
                f"{r['residual_std']:.3f}",
                _percent(cut["accuracy"]),
                drop,
            )
        )
    headers = ["unit", "shortcut", "‖F(x)‖/‖x‖", "std F(x)", "acc. without it", "drop (pts)"]
    print(format_table(headers, rows, align="llrrrr"))
    print(f"intact test accuracy: {_percent(result['lesion']['intact_accuracy'])}")
    worst = result["worst_lesion"]
    if worst is not None:
        print(
            f"worst single-unit lesion: {worst['name']} → {_percent(worst['accuracy'])} "
            f"({100 * worst['drop']:.2f} points lower)"
        )
    stages = ", ".join(f"{k} {v:.3f}" for k, v in result["mean_ratio_per_stage"].items())
    print(f"mean residual ratio per stage: {stages}")
    for version in ("residual", "plain"):
        rows_v = flow[version]
        print(
            f"gradient norm at init, {flow['labels'][version]}: first layer "
            f"{rows_v[0]['grad_norm']:.3g}, last conv {rows_v[-2]['grad_norm']:.3g}, "
            f"classifier {rows_v[-1]['grad_norm']:.3g}"
        )


# --- experiment -----------------------------------------------------------------------------


def _register_experiment(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="reproduce a paper experiment (degradation: plain vs residual at several depths)",
        description="`resunit experiment degradation` trains plain and residual networks of "
        "several depths with one identical recipe, plots training and test error per epoch "
        "side by side (He et al. 2015, Fig. 6) and prints a summary that says what the run "
        "shows. Rerun the same command to resume an interrupted experiment.",
    )
    p.add_argument("name", choices=["degradation"], metavar="EXPERIMENT", help="degradation")
    p.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=[20, 56],
        help="network depths, each trained plain and residual (default: 20 56)",
    )
    p.add_argument("--data", default="digits", choices=DATASETS, help="dataset (default: digits)")
    p.add_argument("--data-root", help="directory holding the dataset (CIFAR)")
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="training recipe (default: the data's own, fast for digits)",
    )
    p.add_argument("--epochs", type=int, help="epochs for every network (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument(
        "--warmup-epochs", type=float, default=2.0, help="linear warm-up epochs (default 2)"
    )
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every network (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument(
        "--out", default="runs/degradation", help="experiment directory (default: runs/degradation)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    add_json_flag(p)
    p.set_defaults(handler=run_experiment)


def run_experiment(args: argparse.Namespace) -> int:
    from resunit.experiments import DegradationConfig, run_degradation

    options = {"lr": args.lr, "batch_size": args.batch_size}
    config = DegradationConfig(
        depths=args.depths,
        data=args.data,
        data_root=args.data_root,
        recipe=args.recipe,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
        out=args.out,
        train_options={k: v for k, v in options.items() if v is not None},
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    summary = run_degradation(config, progress=not args.quiet, log=log)
    if args.json:
        print_json(summary)
        return 0
    print()
    print(format_degradation_table(summary))
    print(f"\n{summary['verdict']}")
    print(f"\nwrote {Path(args.out) / 'summary.json'} and {Path(args.out) / 'degradation.png'}")
    return 0


def format_degradation_table(summary: dict[str, Any]) -> str:
    """The summary as a table: one row per network."""
    rows = [
        (
            r["model"],
            r["depth"],
            r["epochs"],
            _percent(r["final_train_error"]),
            _percent(r["final_test_error"]),
            _percent(r["best_test_error"]),
            f"{r['seconds']:.0f}",
        )
        for r in summary["networks"]
    ]
    headers = ["model", "depth", "epochs", "train error", "test error", "best test", "seconds"]
    return format_table(headers, rows, align="lrrrrrr")


# --- report ---------------------------------------------------------------------------------


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="one self-contained HTML page for a training run or an experiment",
        description="Write a single HTML file (plots embedded, no network access needed) for a "
        "training run directory or an experiment directory: configuration, curves, final "
        "metrics, the inspection table, and residual ratios and lesion results where "
        "`resunit analyze` has written them. A run that lacks its curves plot gets it drawn "
        "into RUN_DIR first.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory of a run or an experiment")
    p.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from resunit.report import write_report

    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory: give a run or experiment directory")
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0
