"""Inference throughput of every deployment variant, side by side, against the machine's limit.

For each model and batch size, every variant runs in this one process, interleaved (each round
runs each variant once, rotating the order), and we report the median of the rounds as images/s
and as ratios to plain eager PyTorch and to ONNX Runtime float32 on the same exported graph
(the faster of its two thread settings: spinning between layers, its default, or sleeping).
Each variant's GFLOP/s (2 × multiply-adds / time) is shown as a fraction of the theoretical
float32 peak and of a measured large GEMM. Then int8 accuracy: a ResNet-20 trained on digits,
quantized through `resunit export --int8`, before/after top-1 on the test split.

    python benchmarks/inference.py                      # the full run (about 10 minutes)
    python benchmarks/inference.py --models resnet20 --batches 1 --repeats 3   # a quick look

Writes benchmarks/results/inference-<date>.json and prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

# `--busy`: the machine is shared with other jobs. Must take effect before torch (and its
# OpenMP runtime) loads. OpenMP threads that busy-wait at the barrier ending every layer hold a
# core while their partner thread is descheduled: on 2 busy cores we measured compiled
# ResNet-20 at batch 32 ~8× slower with the default policy than with PASSIVE (threads sleep at
# once). On an idle virtual machine PASSIVE is the wrong choice: waking a sleeping vCPU for
# every layer made compiled ResNet-20 at batch 1 2.3× slower (324 vs 731 img/s). ONNX
# Runtime's own thread pool is not affected either way; the policy applies to every PyTorch
# variant alike.
if "--busy" in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from machine import cpu_load, describe_machine, measure_gemm_gflops
from results_file import write_results
from resunit import deploy
from resunit.models import create_model, default_input_shape

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = ("resnet18", "resnet50", "resnet20")  # each at its own input size
# Ours; "best float32" is the fastest of them.
FLOAT_VARIANTS = ("folded", "folded_cl", "compiled", "onednn_graph", "onednn_plan")
# The peer: ONNX Runtime float32, with and without spinning threads; the faster is the reference.
ORT_VARIANTS = ("onnxruntime", "onnxruntime_spin")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--variants", default=",".join(deploy.VARIANTS))
    parser.add_argument("--train-epochs", type=int, default=30, help="digits model for int8")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument(
        "--busy", action="store_true", help="other jobs share the CPU: OMP_WAIT_POLICY=PASSIVE"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default results/inference-DATE)")
    return parser.parse_args()


def bench_model(
    name: str, size: int, batches: list[int], variants: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    shape = (3, size, size)
    macs = deploy.count_multiply_adds(model, shape)
    rows = []
    for batch in batches:
        # Forget earlier compiled models so that each measurement starts from a clean Dynamo
        # cache, as a process serving one model would.
        torch._dynamo.reset()
        # Calibration only sets int8 ranges; speed does not depend on the values.
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randn(8, *shape, generator=g) for _ in range(4)]
        built, skipped = deploy.build_variants(
            model, shape, variants, threads=args.threads, calibration_batches=calibration
        )
        x = torch.randn(batch, *shape, generator=g)
        with torch.no_grad():
            reference = model(x)
        timings, diffs = deploy.compare_variants(built, x, reference, repeats=args.repeats)
        del built  # ends ONNX Runtime's thread pools before the next measurement
        eager = timings["eager"].images_per_second
        peers = [timings[v] for v in ORT_VARIANTS if v in timings]
        ort = max((t.images_per_second for t in peers), default=None)
        ort_best = max((batch / min(t.seconds) for t in peers), default=None)
        for vname, t in timings.items():
            rate = t.images_per_second
            spread = (max(t.seconds) - min(t.seconds)) / t.median_seconds
            best = batch / min(t.seconds)
            rows.append(
                {
                    "model": name,
                    "input": list(shape),
                    "batch": batch,
                    "variant": vname,
                    "images_per_second": rate,
                    "vs_eager": rate / eager,
                    "vs_onnxruntime": rate / ort if ort else None,
                    # The fastest round: closest to an idle machine when others' jobs interfere.
                    "best_images_per_second": best,
                    "best_vs_onnxruntime": best / ort_best if ort_best else None,
                    "gflops": 2 * macs * rate / 1e9,
                    "max_relative_difference": diffs[vname],
                    "seconds": t.seconds,
                    "spread": spread,
                }
            )
        for vname, why in skipped.items():
            print(f"  {name} batch {batch}: skipped {vname}: {why}", file=sys.stderr)
        print(f"  done {name} batch {batch} (load {cpu_load()})", file=sys.stderr)
    return rows


def int8_accuracy(epochs: int, threads: int) -> dict[str, Any]:
    """Train ResNet-20 on digits, then `resunit export --int8` reports accuracy before/after."""
    from resunit.cli import main
    from resunit.train import make_config, train

    with tempfile.TemporaryDirectory(prefix="resunit-bench-") as tmp:
        # The digits recipe, exactly what `resunit train --data digits` runs.
        config = make_config(model="resnet20", data="digits", epochs=epochs, out=tmp,
                             threads=threads, seed=0)  # fmt: skip
        summary = train(config, progress=False)
        checkpoint = Path(summary["run_dir"]) / "last.pt"
        argv = ["export", "--checkpoint", str(checkpoint), "--onnx", f"{tmp}/m.int8.onnx",
                "--int8", "--json"]  # fmt: skip
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(argv)
        if code != 0:
            raise SystemExit(f"resunit export --int8 failed with exit code {code}")
        result = json.loads(buffer.getvalue())
        if deploy.pt2e_available():
            pt2e = pt2e_accuracy(checkpoint)
            result["accuracy_int8_pt2e"], result["top1_agreement_pt2e"] = pt2e
    result["train_epochs"] = epochs
    result["train_test_accuracy"] = summary["test_accuracy"]
    result["command"] = (
        f"resunit train --model resnet20 --data digits --epochs {epochs} --out RUN && "
        "resunit export --checkpoint RUN/last.pt --onnx m.int8.onnx --int8"
    )
    return result


def pt2e_accuracy(checkpoint: Path) -> tuple[float, float]:
    """Test accuracy of the PT2E int8 model, calibrated on the same images as the CLI's, and
    how often it predicts the float32 model's class."""
    from resunit.checkpoint import load_model
    from resunit.cli.deploy import CALIBRATION_BATCH_SIZE, DEFAULT_CALIBRATION_BATCHES
    from resunit.data import load_dataset
    from resunit.evaluation import evaluate, top1_agreement

    model, config = load_model(checkpoint)
    train_set = load_dataset(config["data"], "train")
    test_set = load_dataset(config["data"], "test")
    size = config["input_size"]
    batches = deploy.calibration_sample(
        train_set, DEFAULT_CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE, size
    )
    int8 = deploy.quantize_pt2e(model, batches)
    after = evaluate(int8, test_set, input_size=size, device="cpu", predictions=True)
    before = evaluate(model, test_set, input_size=size, device="cpu", predictions=True)
    return after["accuracy"], top1_agreement(after["predictions"], before["predictions"])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and batch: our best float32 vs ONNX Runtime, and int8 vs our best float32."""
    out = []
    for key in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        group = {r["variant"]: r for r in rows if (r["model"], r["batch"]) == key}
        ours = [group[v] for v in FLOAT_VARIANTS if v in group]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["images_per_second"])
        entry = {"model": key[0], "batch": key[1], "best_float32": best["variant"],
                 "best_float32_images_per_second": best["images_per_second"]}  # fmt: skip
        if best["vs_onnxruntime"] is not None:
            # vs the faster ONNX Runtime configuration (spinning or not)
            reference = max(
                (group[v] for v in ORT_VARIANTS if v in group),
                key=lambda r: r["images_per_second"],
            )
            entry["best_float32_vs_onnxruntime"] = best["vs_onnxruntime"]
            entry["onnxruntime_reference"] = reference["variant"]
            entry["best_float32_vs_onnxruntime_paired"] = _paired(reference, best)
        # ONNX Runtime int8 at its better thread setting, as its float32 is taken above.
        ort_int8 = [group[v] for v in ("int8", "int8_spin") if v in group]
        candidates = {"int8_pt2e": group.get("int8_pt2e")}
        if ort_int8:
            candidates["int8"] = max(ort_int8, key=lambda r: r["images_per_second"])
            entry["int8_variant"] = candidates["int8"]["variant"]
        for int8, row in candidates.items():
            if row is not None:
                entry[f"{int8}_vs_best_float32"] = (
                    row["images_per_second"] / best["images_per_second"]
                )
                entry[f"{int8}_vs_best_float32_paired"] = _paired(best, row)
        out.append(entry)
    return out


def summary_line(entry: dict[str, Any]) -> str:
    """One model and batch: the targets' ratios, each round-by-round with its interval."""
    parts = [f"{entry['model']} batch {entry['batch']}: best float32 is {entry['best_float32']}"]
    if "best_float32_vs_onnxruntime_paired" in entry:
        parts.append(
            f"vs {entry['onnxruntime_reference']}: "
            f"{entry['best_float32_vs_onnxruntime_paired']['text']}"
        )
    for int8 in ("int8", "int8_pt2e"):
        if f"{int8}_vs_best_float32_paired" in entry:
            name = entry.get("int8_variant", int8) if int8 == "int8" else int8
            parts.append(f"{name} vs it: {entry[f'{int8}_vs_best_float32_paired']['text']}")
    return "; ".join(parts)


def _paired(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """The round-by-round ratio (see deploy.paired_ratio): the verdict's uncertainty."""
    ratio = deploy.paired_ratio(reference["seconds"], candidate["seconds"])
    return {**dataclasses.asdict(ratio), "text": ratio.describe()}


def markdown(rows: list[dict[str, Any]], peak: float, gemm: float) -> str:
    lines = []
    for key in dict.fromkeys((r["model"], tuple(r["input"])) for r in rows):
        lines.append(f"\n**{key[0]}**, input {'×'.join(map(str, key[1]))}\n")
        lines.append("| variant | batch | img/s | × eager | × ORT fp32 | GFLOP/s | % peak | "
                     "% GEMM | max rel. diff | best img/s (× ORT) |")  # fmt: skip
        lines.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            if (r["model"], tuple(r["input"])) != key:
                continue
            ort = "-" if r["vs_onnxruntime"] is None else f"{r['vs_onnxruntime']:.2f}"
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['images_per_second']:.1f} | "
                f"{r['vs_eager']:.2f} | {ort} | {r['gflops']:.0f} | "
                f"{100 * r['gflops'] / peak:.0f}% | {100 * r['gflops'] / gemm:.0f}% | "
                f"{r['max_relative_difference']:.1e} | {r['best_images_per_second']:.1f} "
                f"({_ratio(r['best_vs_onnxruntime'])}) |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # As a serving process would: without it, every large activation is page-faulted in again
    # on every call (see resunit.deploy.retain_freed_memory). ONNX Runtime has its own arena.
    retained = deploy.retain_freed_memory()
    models = {m: default_input_shape(m)[-1] for m in args.models.split(",") if m}
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if "eager" not in variants:  # every ratio is also given to the plain eager model
        variants.insert(0, "eager")
    started = dt.datetime.now(dt.timezone.utc)
    machine = describe_machine(args.threads)
    print(machine.describe(), file=sys.stderr)
    load_before = cpu_load()
    # The best of many: a GEMM is what the cores deliver when nothing else runs.
    gemm_runs = [measure_gemm_gflops() for _ in range(3)]
    gemm_by_library = {lib: max(run[lib] for run in gemm_runs) for lib in gemm_runs[0]}
    gemm = max(gemm_by_library.values())
    gemm_text = ", ".join(f"{lib} {rate:.0f}" for lib, rate in gemm_by_library.items())
    print(f"measured 4096³ float32 GEMM, GFLOP/s: {gemm_text}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    for name, size in models.items():
        rows += bench_model(name, size, batches, variants, args)
    accuracy = None if args.skip_accuracy else int8_accuracy(args.train_epochs, args.threads)

    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine.to_dict(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "torchao": _version("torchao"),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "retain_freed_memory": retained,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": cpu_load(),
        "gemm_gflops": gemm,  # the faster library's
        "gemm_gflops_by_library": gemm_by_library,
        "results": rows,
        "summary": summarize(rows),
        "int8_accuracy": accuracy,
        "command": "python benchmarks/inference.py " + " ".join(sys.argv[1:]),
    }
    out = write_results(args.out or RESULTS / f"inference-{started:%Y-%m-%d}.json", result)

    print(f"# {started:%Y-%m-%d %H:%M} UTC — {machine.describe()}")
    print(f"measured GEMM {gemm:.0f} GFLOP/s ({gemm_text})")
    print(f"load average {load_before} → {cpu_load()}")
    print(markdown(rows, machine.peak_gflops(), gemm))
    print()
    for s in result["summary"]:
        print(summary_line(s))
    if accuracy:
        pt2e = accuracy.get("accuracy_int8_pt2e")
        print(f"int8 accuracy on digits test ({accuracy['test_images']} images): "
              f"float32 {accuracy['accuracy_float32']:.2%} → ONNX Runtime int8 "
              f"{accuracy['accuracy_int8']:.2%} (same class as float32: "
              f"{accuracy['top1_agreement']:.2%})"
              + (f", PT2E int8 {pt2e:.2%} (same class: {accuracy['top1_agreement_pt2e']:.2%})"
                 if pt2e is not None else ""))  # fmt: skip
    print(f"wrote {out}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
