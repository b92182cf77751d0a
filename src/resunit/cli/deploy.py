"""``resunit export`` and ``resunit bench``: ship a trained model and see how fast it runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from resunit.analysis import shape_text
from resunit.atomic import atomic_path
from resunit.cli.common import add_json_flag, comma_separated, format_table, print_json
from resunit.errors import ConfigError, ResunitError
from resunit.outputs import prepare_output_file

# What `--int8` calibrates on by default: 8 batches of 32 training images.
DEFAULT_CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a trained checkpoint to ONNX (BatchNorm folded, verified in ONNX Runtime)",
        description="Fold BatchNorm into the convolutions, export to ONNX and check the file in "
        "ONNX Runtime against PyTorch on random inputs (≤ 1e-4 relative). With --int8, "
        "quantize it to int8 for x86 CPUs, calibrated on the training split, and report the "
        "test accuracy before and after. Needs the [onnx] extra.",
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint from `resunit train`")
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="file to write")
    export.add_argument(
        "--input",
        metavar="C×H×W",
        help="input shape, e.g. 3x224x224 (default: the checkpoint's channels and input size)",
    )
    export.add_argument(
        "--dynamic-batch", action="store_true", help="leave the batch dimension symbolic"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="write a statically quantized int8 model instead (its batch dimension is dynamic)",
    )
    export.add_argument(
        "--calibration-batches",
        type=int,
        metavar="N",
        help=f"int8: calibrate on N batches of {CALIBRATION_BATCH_SIZE} training images "
        f"(default {DEFAULT_CALIBRATION_BATCHES})",
    )
    export.add_argument(
        "--data-root",
        metavar="DIR",
        help="int8: where the run's data is now, if it moved (default: where it was trained)",
    )
    export.add_argument(
        "--calibration",
        choices=("percentile", "minmax", "entropy"),
        help="int8: how activation ranges are chosen (default percentile: 99.999%%)",
    )
    add_json_flag(export, instead_of="text")
    export.set_defaults(handler=run_export)

    bench = subparsers.add_parser(
        "bench",
        help="images/s of every float32 way to run a model, PyTorch and ONNX Runtime, side by side",
        description="Measure inference throughput of one model in several forms in the same "
        "process, interleaved, and print each as a ratio to plain eager PyTorch and to ONNX "
        "Runtime; the latter is the median of the rounds' ratios, with the range that holds "
        "it with at least 90% confidence (98% for the default 10 rounds), so a ratio near 1.0 "
        "says whether it could be noise. Random weights and inputs: speed does not depend on "
        "them. On a machine "
        "busy with other jobs, run it as `OMP_WAIT_POLICY=PASSIVE resunit bench …`: by "
        "default PyTorch's OpenMP threads busy-wait for each other at every layer and can be "
        "several times slower there (ONNX Runtime's thread pool is not affected); on an idle "
        "machine leave the default, which is faster. Freed memory is kept for reuse "
        "(resunit.deploy.retain_freed_memory), as a server should: large batches otherwise "
        "page-fault their activations in again on every call.",
    )
    bench.add_argument("model", help="a registered model name (see `resunit models`)")
    bench.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    bench.add_argument(
        "--input", metavar="C×H×W", help="input shape (default 3x224x224, 3x32x32 for CIFAR)"
    )
    bench.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    bench.add_argument(
        "--repeats", type=int, default=10, help="timed runs per variant (default 10)"
    )
    bench.add_argument(
        "--variants",
        default="eager,folded,folded_cl,compiled,onednn_graph,onednn_plan,onnxruntime,"
        "onnxruntime_spin",
        help="comma-separated subset of eager, folded, folded_cl, compiled, onednn_graph, "
        "onednn_plan, onnxruntime, onnxruntime_spin (ONNX Runtime with its threads spinning "
        "between layers, its own default; default: all)",
    )
    add_json_flag(bench)
    bench.set_defaults(handler=run_bench)


# --- export ----------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    from resunit import deploy
    from resunit.checkpoint import FEEDING_FIELDS, load_model

    int8_only = [
        flag
        for flag, value in [
            ("--calibration-batches", args.calibration_batches),
            ("--calibration", args.calibration),
            ("--data-root", args.data_root),
        ]
        if value is not None
    ]
    if int8_only and not args.int8:  # refused rather than ignored
        verb = "is" if len(int8_only) == 1 else "are"
        raise ConfigError(f"{', '.join(int8_only)} {verb} for --int8, which reads the run's images")
    if args.calibration_batches is None:
        args.calibration_batches = DEFAULT_CALIBRATION_BATCHES
    if args.calibration is None:
        args.calibration = "percentile"
    if args.calibration_batches < 1:
        raise ConfigError("--calibration-batches must be at least 1")
    deploy.require_onnx()  # fail before any work when the extra is missing
    # int8 feeds it the run's images: calibration and the accuracy before and after.
    model, config = load_model(args.checkpoint, needs=FEEDING_FIELDS if args.int8 else ())
    input_shape = (
        deploy.parse_input_shape(args.input) if args.input else _checkpoint_input_shape(config)
    )
    out = prepare_output_file(args.onnx, "--onnx")  # before any work
    if args.int8 and input_shape[1] != input_shape[2]:
        raise ConfigError(f"--int8 needs a square --input (H = W), got {shape_text(input_shape)}")
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": config.get("model"),
        "input": list(input_shape),
        "dynamic_batch": bool(args.dynamic_batch or args.int8),
    }
    # Written beside `out` and renamed only once checked: a failed check leaves no file, and
    # an earlier good export at that path stays as it was. (Not outputs.atomic_output: it would
    # call any OSError in here, reading the int8 data included, a failure to write `out`.)
    with _atomic_export(out) as tmp:
        if not args.int8:
            deploy.export_onnx(model, tmp, input_shape, dynamic_batch=args.dynamic_batch)
            batch_sizes = (1, 3) if args.dynamic_batch else (1,)
            check = deploy.verify_onnx(tmp, model, input_shape, batch_sizes=batch_sizes)
            result.update(_check_summary(out, check))
        else:
            result.update(
                _export_int8(
                    model,
                    config,
                    input_shape,
                    tmp,
                    args.calibration_batches,
                    args.calibration,
                    args.data_root,
                )
            )
            result["onnx"] = str(out)
    if args.json:
        print_json(result)
        return 0
    print(f"wrote {out} ({result['format']}, input {shape_text(input_shape)})")
    checked = " the float32 graph (before quantization)" if args.int8 else ""
    batches = ", ".join(map(str, result["verified_batches"]))
    print(
        f"verified{checked} in ONNX Runtime: max difference "
        f"{result['max_relative_difference']:.1e} relative to PyTorch on random inputs "
        f"(batch {batches}; tolerance {result['tolerance']:.0e})"
    )
    if args.int8:
        before, after = result["accuracy_float32"], result["accuracy_int8"]
        print(
            f"int8: calibrated on {result['calibration_images']} {result['dataset']} training "
            f"images; test accuracy {before:.2%} float32 → {after:.2%} int8 "
            f"({(after - before) * 100:+.2f} points, {result['test_images']} images); the two "
            f"predict the same class for {result['top1_agreement']:.2%} of them"
        )
    return 0


def _check_summary(path: Path, check: Any) -> dict[str, Any]:
    return {
        "onnx": str(path),
        "format": "float32, BatchNorm folded",
        "verified": check.passed,
        "verified_batches": check.batch_sizes,
        "max_relative_difference": check.max_relative_difference,
        "tolerance": check.tolerance,
    }


def _export_int8(
    model: torch.nn.Module,
    config: dict[str, Any],
    input_shape: tuple[int, int, int],
    out: Path,
    calibration_batches: int,
    method: str,
    data_root: str | None,
) -> dict[str, Any]:
    from resunit import deploy
    from resunit.evaluation import evaluate, top1_agreement
    from resunit.train import load_run_data

    # The data as the run saw it: same options and partition, its training normalisation.
    train_set = load_run_data(config, "train", root=data_root)
    test_set = load_run_data(config, "test", root=data_root)
    input_size = input_shape[-1]
    batches = deploy.calibration_sample(
        train_set, calibration_batches, CALIBRATION_BATCH_SIZE, input_size
    )
    count = sum(len(batch) for batch in batches)
    # The float graph is checked first, so an accuracy drop can only come from quantization.
    with tempfile.TemporaryDirectory(prefix="resunit-export-") as tmp:
        float_path = deploy.export_onnx(
            model, Path(tmp) / "float.onnx", input_shape, dynamic_batch=True
        )
        check = deploy.verify_onnx(float_path, model, input_shape, batch_sizes=(1, 3))
    int8_model = deploy.quantize(model, batches, out, method=method)
    before = evaluate(model, test_set, input_size=input_size, device="cpu", predictions=True)
    after = evaluate(int8_model, test_set, input_size=input_size, device="cpu", predictions=True)
    # Still informative where both are (nearly) always right, as on the digits.
    agreement = top1_agreement(after["predictions"], before["predictions"])
    summary = _check_summary(out, check)
    summary.update(
        {
            "format": "int8 (static, per-channel, QDQ)",
            "verified_graph": "float32, before quantization",
            "dataset": test_set.name,
            "calibration_images": count,
            "calibration_method": method,
            "test_images": before["count"],
            "accuracy_float32": before["accuracy"],
            "accuracy_int8": after["accuracy"],
            "top1_agreement": agreement,
        }
    )
    return summary


def _checkpoint_input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    size = config.get("input_size") or (config.get("image_size") or [None])[0]
    if not size:
        raise ConfigError("the checkpoint does not record its input size: pass --input C×H×W")
    return int(config.get("in_chans") or 3), int(size), int(size)


# --- bench -----------------------------------------------------------------------------------


def _parse_batches(text: str) -> list[int]:
    items = comma_separated(text, "--batch")
    try:
        batches = [int(b) for b in items]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch takes positive integers separated by commas, got {text!r}")
    if len(set(batches)) < len(batches):  # "1,01": the same batch twice
        raise ConfigError(f"--batch names a batch size more than once: {text!r}")
    return batches


def run_bench(args: argparse.Namespace) -> int:
    from resunit import deploy
    from resunit.models import create_model, default_input_shape

    default_shape = default_input_shape(args.model)  # a clear error for unknown names, first
    batches = _parse_batches(args.batch)
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    input_shape = deploy.parse_input_shape(args.input) if args.input else default_shape
    names = comma_separated(args.variants, "--variants")
    float32 = ", ".join(deploy.FLOAT32_VARIANTS)
    if any(n not in deploy.FLOAT32_VARIANTS for n in names):
        raise ConfigError(
            f"--variants takes some of {float32} (int8 is timed by benchmarks/inference.py), "
            f"got {args.variants!r}"
        )
    torch.manual_seed(0)
    model = create_model(args.model, in_chans=input_shape[0]).eval()
    # Building (export, trace, compile) and timing take minutes for big models: say so on
    # stderr, where a --json reader does not look.
    print(f"building {len(names)} variants of {args.model}…", file=sys.stderr, flush=True)
    variants, skipped = deploy.build_variants(
        model, input_shape, names, threads=torch.get_num_threads()
    )
    if not variants:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise ConfigError(f"none of the variants asked for can run here ({reasons})")
    deploy.retain_freed_memory()
    rows = []
    for batch in tqdm(batches, desc="timing batch sizes", unit="batch", file=sys.stderr):
        x = torch.randn(batch, *input_shape)
        with torch.no_grad():
            reference = model(x)
        timings, differences = deploy.compare_variants(variants, x, reference, repeats=args.repeats)
        eager = timings.get("eager")
        # The peer is ONNX Runtime at its best: spinning or not, whichever is faster here.
        ort = max(
            (t for n, t in timings.items() if n in ("onnxruntime", "onnxruntime_spin")),
            key=lambda t: t.images_per_second,
            default=None,
        )
        for name, timing in timings.items():
            rate = timing.images_per_second
            rows.append(
                {
                    "variant": name,
                    "batch": batch,
                    "images_per_second": rate,
                    "vs_eager": rate / eager.images_per_second if eager else None,
                    "vs_onnxruntime": rate / ort.images_per_second if ort else None,
                    # How sure that ratio is: the same ratio round by round, with an interval.
                    "vs_onnxruntime_paired": (
                        dataclasses.asdict(deploy.paired_ratio(ort.seconds, timing.seconds))
                        if ort
                        else None
                    ),
                    "max_relative_difference": differences[name],
                    "description": variants[name].description,
                }
            )
    result = {
        "model": args.model,
        "input": list(input_shape),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": rows,
        "skipped": skipped,
    }
    if args.json:
        print_json(result)
        return 0
    print(
        f"{args.model}, input {shape_text(input_shape)}, {result['threads']} threads, "
        f"median of {args.repeats} interleaved runs"
    )
    table = [
        (
            r["variant"],
            r["batch"],
            f"{r['images_per_second']:.1f}",
            _ratio(r["vs_eager"]),
            _interval(r["vs_onnxruntime_paired"]),
            f"{r['max_relative_difference']:.1e}",
        )
        for r in rows
    ]
    headers = ["variant", "batch", "img/s", "× eager", "× best ORT", "max rel. diff"]
    print(format_table(headers, table, align="lrrrrr"))
    paired = next((r["vs_onnxruntime_paired"] for r in rows if r["vs_onnxruntime_paired"]), None)
    if paired and paired["confidence"] >= _SHOWN_CONFIDENCE:
        print(
            "× best ORT: the median of the rounds' ratios to the faster ONNX Runtime mode, and "
            f"the range that holds it with {paired['confidence']:.0%} confidence"
        )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


@contextlib.contextmanager
def _atomic_export(out: Path) -> Iterator[Path]:
    """:func:`atomic_path` for ``out``, whose errors name ``out``, the file the user asked
    for, rather than the temporary file beside it (``.model.onnx.x1y2.tmp``) the work is on."""
    with atomic_path(out) as tmp:
        try:
            yield tmp
        except ResunitError as exc:
            if str(tmp) not in str(exc):
                raise
            raise type(exc)(str(exc).replace(str(tmp), str(out))) from None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# Below this, an interval from so few rounds says little: the cell shows the median alone.
_SHOWN_CONFIDENCE = 0.9


def _interval(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "-"
    if paired["confidence"] < _SHOWN_CONFIDENCE:
        return f"{paired['median']:.2f} (few rounds)"
    return f"{paired['median']:.2f} ({paired['low']:.2f}-{paired['high']:.2f})"
