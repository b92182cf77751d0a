"""``resunit train``, ``eval``, ``predict`` and ``data download``: parsing and printing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from resunit.cli.common import add_json_flag, format_table, print_json
from resunit.data import DATASETS, DOWNLOADS, download_dataset
from resunit.errors import ConfigError
from resunit.train_config import RECIPES, SCHEDULES, TrainConfig, make_config


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_predict(subparsers)
    _register_data(subparsers)


# --- train ----------------------------------------------------------------------------------


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a residual network (default: resnet20 on the embedded digits)",
        description="Train a model on real images. With no options: resnet20 on scikit-learn's "
        "8×8 handwritten digits with the `fast` recipe (nothing to download). Each option "
        "left out comes from the recipe (default: `fast` for digits, `he2015` for CIFAR), then "
        "from the built-in defaults. Under torchrun, trains with DistributedDataParallel.",
    )
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--model",
        help=f"registered model name (`resunit models`; built-in default {defaults.model})",
    )
    g.add_argument(
        "--data", choices=DATASETS, help="dataset (default: digits; cifar10 with --recipe he2015)"
    )
    g.add_argument("--data-root", help="directory holding the dataset (CIFAR: default data/)")
    g.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="named preset of hyper-parameters (default: fast on digits, he2015 on CIFAR)",
    )
    g.add_argument("--out", help="run directory (default runs/DATA-MODEL-TIMESTAMP)")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from last.pt, with its own settings (only --data-root "
        "may be given: where its data is now)",
    )
    g = p.add_argument_group("schedule")
    g.add_argument(
        "--epochs",
        type=int,
        help=f"number of epochs (default: {RECIPES['fast']['epochs']} on digits; he2015/CIFAR "
        f"counts {RECIPES['he2015']['steps']:,} steps unless --epochs is given; else "
        f"{TrainConfig().epochs})",
    )
    g.add_argument(
        "--steps",
        type=int,
        help=f"number of iterations, overriding --epochs (default: "
        f"{RECIPES['he2015']['steps']:,} with he2015/CIFAR, else set by --epochs)",
    )
    g.add_argument("--batch-size", type=int, help="images per step per process")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="L2 on conv/linear weights (not BN, bias)")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    g.add_argument(
        "--milestones",
        type=float,
        nargs="+",
        help="multistep: fractions of training at which lr is multiplied by gamma",
    )
    g.add_argument("--gamma", type=float, help="multistep: lr factor at each milestone")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs")
    g.add_argument("--label-smoothing", type=float, help="label smoothing (0 = none)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--crop-padding", type=int, help="pad by N pixels, then random crop (0 = off)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip")
    g.add_argument("--cutout", type=int, help="cutout square size in pixels (0 = off)")
    g.add_argument(
        "--val-fraction",
        type=float,
        help="carve this fraction of train as validation, on which best.pt is picked "
        "(without one, best.pt holds the final weights; never picked on the test set)",
    )
    g.add_argument("--input-size", type=int, help="resize images to N×N before the model")
    g.add_argument(
        "--model-option",
        action="append",
        metavar="KEY=VALUE",
        dest="model_options",
        help="model option, repeatable: shortcut=A|B|C (the paper's options), "
        "zero_init_residual=true (Goyal et al.), drop_path_rate=0.1 (stochastic depth), "
        "dropout=0.3 (Wide ResNets), or another single-valued argument of resunit.ResNet "
        "(num_classes and in_chans come from the data)",
    )
    g.add_argument(
        "--data-option",
        action="append",
        metavar="KEY=VALUE",
        dest="data_options",
        help="dataset option, repeatable: image_size=32, channels=1|3 and on_error=skip|fail "
        "(imagefolder); num_samples, image_size, num_classes, channels, seed (synthetic); "
        "val_seed (any)",
    )
    g = p.add_argument_group("speed and reproducibility")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    g.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads for torch (default: {RECIPES['fast']['threads']} on digits, else "
        "torch's own; 0: leave torch's setting)",
    )
    g.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    g.add_argument(
        "--channels-last", action="store_true", default=None, help="channels_last memory format"
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--seed", type=int, help="random seed (weights, data order, augmentation)")
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log to RUN_DIR/tensorboard (needs the tensorboard package)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    add_json_flag(p)
    for action in p._actions:
        if action.dest in _TRAIN_OPTIONS and action.dest not in _OWN_DEFAULT_TEXT:
            action.help += _default_text(action.dest)
    p.set_defaults(handler=run_train)


_OWN_DEFAULT_TEXT = {"model", "data", "data_root", "out", "epochs", "steps", "threads"}


def _default_text(name: str) -> str:
    """Where an option's value comes from when it is not given: recipe, else built-in."""

    def show(value: Any) -> str:
        # `is`, not `in`/`==`: 0 == False, and a default of 0 (seed) is a number, not "off".
        text = "off" if value is None or value is False else "on" if value is True else str(value)
        return text.replace("%", "%%")  # argparse formats help strings with %

    builtin = getattr(TrainConfig(), name)
    fast = RECIPES["fast"].get(name, builtin)
    paper = RECIPES["he2015"].get(name, builtin)
    if fast == paper == builtin:
        return f" (default: {show(builtin)})"
    return (
        f" (default: {show(fast)} on digits, {show(paper)} with he2015/CIFAR, else {show(builtin)})"
    )


_TRAIN_OPTIONS = [
    "model",
    "data",
    "data_root",
    "out",
    "epochs",
    "steps",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "milestones",
    "gamma",
    "warmup_epochs",
    "label_smoothing",
    "crop_padding",
    "flip",
    "cutout",
    "val_fraction",
    "input_size",
    "device",
    "threads",
    "bf16",
    "channels_last",
    "compile",
    "seed",
    "tensorboard",
]


def run_train(args: argparse.Namespace) -> int:
    from resunit.allocator import retain_freed_memory
    from resunit.train import train

    # This command owns its process: keep freed activations for the next step instead of
    # page-faulting them in again (see retain_freed_memory; training peaks every step anyway).
    retain_freed_memory()

    if args.resume:
        # --data-root may change: where the data now lives does not change the continuation.
        given = [
            name
            for name in _TRAIN_OPTIONS
            if getattr(args, name) is not None and name != "data_root"
        ]
        given += ["data_option"] * bool(args.data_options)
        given += ["model_option"] * bool(args.model_options)
        if given or args.recipe:
            options = ", ".join(
                "--" + n.replace("_", "-") for n in given + ["recipe"] * bool(args.recipe)
            )
            raise ConfigError(
                "--resume continues with the run's own settings (kept in its last.pt); "
                f"drop {options}"
            )
        summary = train(
            TrainConfig(),
            progress=not args.no_progress and not args.json,
            resume=args.resume,
            data_root=args.data_root,
        )
    else:
        ignored = [f"--{n}" for n in ("milestones", "gamma") if getattr(args, n) is not None]
        options = {name: getattr(args, name) for name in _TRAIN_OPTIONS}
        options["data_options"] = _parse_key_values(args.data_options, "--data-option")
        options["model_overrides"] = _parse_key_values(args.model_options, "--model-option")
        config = make_config(args.recipe, **options)
        if ignored and config.schedule != "multistep":
            raise ConfigError(
                f"{' and '.join(ignored)} {'shape' if len(ignored) > 1 else 'shapes'} the "
                f"multistep schedule; this run's is "
                f"{config.schedule} (add --schedule multistep, or drop them)"
            )
        summary = train(config, progress=not args.no_progress and not args.json)
    if summary.get("is_main", True) is False:
        return 0
    if args.json:
        print_json(summary)
    elif summary["interrupted"]:
        print(
            f"interrupted after {summary['steps']} steps; checkpoint saved. Continue with:\n"
            f"  resunit train --resume {summary['run_dir']}"
        )
    else:
        _print_summary(summary)
    return 130 if summary["interrupted"] else 0


def _parse_key_values(items: list[str] | None, option: str) -> dict[str, Any] | None:
    """``["dropout=0.3", "zero_init_residual=true"]`` as ``{"dropout": 0.3, …: True}``:
    numbers and true/false become what they say, anything else stays text."""
    if not items:
        return None
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE, got {item!r}")
        options[key.strip()] = _option_value(value.strip())
    return options


def _option_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [
        ("model", summary["model"]),
        ("data", summary["data"]),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("time", f"{summary['seconds']:.1f} s ({summary['images_per_second']:,.0f} img/s)"),
    ]
    total = summary.get("training_seconds")
    if total is not None and total > summary["seconds"] + 1:  # resumed: earlier sessions count
        rows.append(("training time, all sessions", f"{total:.1f} s"))
    if summary.get("best_val_accuracy") is not None:
        rows.append(
            (
                "best val accuracy",
                f"{summary['best_val_accuracy']:.2%} (epoch {summary['best_epoch']})",
            )
        )
    # The final weights are what last.pt holds (and best.pt, unless validation picked an
    # earlier epoch): say which, so `resunit eval best.pt` giving another number is no surprise.
    rows.append(("test accuracy, final weights", f"{summary['test_accuracy']:.2%}"))
    rows.append(("run directory", summary["run_dir"]))
    print(format_table(["", "result"], rows))


# --- eval -----------------------------------------------------------------------------------


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="test accuracy, per-class accuracy and confusion matrix of a checkpoint",
        description="Evaluate a trained checkpoint on its dataset's test split (or another "
        "dataset with the same classes). Prints accuracy, per-class accuracy and the confusion "
        "matrix, and writes the confusion matrix as a PNG.",
    )
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt from `resunit train`")
    p.add_argument("--data", choices=DATASETS, help="dataset (default: the one it was trained on)")
    p.add_argument("--data-root", help="directory holding the dataset")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="which split (default: test; val: the part of train the run held out, when it did; "
        "train then excludes it)",
    )
    p.add_argument(
        "--batch-size", type=int, default=500, help="images per forward pass (default: 500)"
    )
    p.add_argument("--plot", help="confusion-matrix PNG path (default: next to the checkpoint)")
    add_json_flag(p)
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from resunit.checkpoint import FEEDING_FIELDS, load_model
    from resunit.evaluation import evaluate
    from resunit.train import load_run_data

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    model, config = load_model(args.checkpoint, needs=FEEDING_FIELDS)
    data = args.data or config.get("data", "digits")
    dataset = load_run_data(config, args.split, data, args.data_root)
    result = evaluate(model, dataset, args.batch_size, input_size=config.get("input_size"))
    plot = (
        Path(args.plot)
        if args.plot
        else (Path(args.checkpoint).with_name(f"confusion_{data}_{args.split}.png"))
    )
    try:
        from resunit.plots import plot_confusion_matrix

        plot_confusion_matrix(
            result["confusion_matrix"],
            result["classes"],
            plot,
            title=f"{config['model']} on {data} {args.split}",
        )
        result["confusion_png"] = str(plot)
    except ImportError:
        result["confusion_png"] = None
    result.update(checkpoint=args.checkpoint, data=data, split=args.split)
    if args.json:
        print_json(result)
        return 0
    print(
        f"{config['model']} on {data} {args.split}: accuracy {result['accuracy']:.2%} "
        f"({result['count']} images, loss {result['loss']:.4f})\n"
    )
    classes = result["classes"]
    rows = [
        (c, "-" if a is None else f"{a:.2%}", sum(result["confusion_matrix"][i]))
        for i, (c, a) in enumerate(zip(classes, result["per_class_accuracy"], strict=True))
    ]
    print(format_table(["class", "accuracy", "images"], rows, align="lrr"))
    if len(classes) <= 20:
        print("\nconfusion matrix (rows: true class, columns: predicted)")
        matrix = [[c, *row] for c, row in zip(classes, result["confusion_matrix"], strict=True)]
        print(format_table(["", *classes], matrix, align="l" + "r" * len(classes)))
    if result["confusion_png"]:
        print(f"\nconfusion matrix plot: {result['confusion_png']}")
    return 0


# --- predict --------------------------------------------------------------------------------


def _register_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-k classes of image files",
        description="Classify image files of any size or mode (grayscale, RGB, RGBA, palette): "
        "each is converted and resized to what the model was trained on. Transparent pixels "
        "are laid on white, as a viewer shows them.",
    )
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt from `resunit train`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--top-k", type=int, default=3, help="how many classes to show per image (default: 3)"
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="invert brightness first: for dark ink on light paper, when the model learnt light "
        "strokes on dark (the default digits data does)",
    )
    add_json_flag(p)
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from resunit.train import predict_files

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be ≥ 1, got {args.top_k}")
    results = predict_files(args.checkpoint, args.images, top_k=args.top_k, invert=args.invert)
    if args.json:
        print_json(results)
        return 0
    for item in results:
        print(item["image"])
        for rank, (name, prob) in enumerate(
            zip(item["classes"], item["probabilities"], strict=True), 1
        ):
            print(f"  {rank}. {name:<20} {prob:7.2%}")
    return 0


# --- data download --------------------------------------------------------------------------


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="dataset utilities (download)", description="Dataset utilities."
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    d = sub.add_parser(
        "download",
        help="fetch, verify (MD5) and extract an official dataset archive",
        description="Download the official archive, check its MD5, extract it atomically into "
        "ROOT (an interrupted download leaves nothing behind). Does nothing if it is already "
        "there.",
    )
    d.add_argument(
        "name", choices=sorted(DOWNLOADS), metavar="DATASET", help=", ".join(sorted(DOWNLOADS))
    )
    d.add_argument(
        "--root",
        help="directory to extract into (default: $RESUNIT_DATA, else data; where training "
        "looks when --data-root is not given)",
    )
    d.add_argument("--url", help="download from this URL (a mirror) instead of the official one")
    d.add_argument(
        "--md5", help="expected MD5 of the archive at --url (32 hex digits; only with --url)"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(handler=run_download)
    # No subcommand is a usage error: the help goes to stderr, as every error does.
    p.set_defaults(handler=lambda args: (p.print_help(sys.stderr), 2)[1])


def run_download(args: argparse.Namespace) -> int:
    from resunit.data import DOWNLOADS as known
    from resunit.data import default_data_root

    root = args.root or default_data_root(args.name) or "data"
    already = (Path(root) / known[args.name][2]).is_dir()
    target = download_dataset(
        args.name, root, url=args.url, md5=args.md5, progress=not args.no_progress
    )
    print(f"{args.name} {'already' if already else 'now'} in {target}")
    return 0
