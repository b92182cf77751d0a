"""Where the time goes, layer by layer: ``optimize(compile="onednn_graph")`` against ONNX
Runtime on the same folded network, each convolution matched by its shape.

`benchmarks/inference.py` says which is faster; this says where. Each side runs its own
instrumentation in a process of its own, and the last of several forwards is kept:

- ours with ``ONEDNN_VERBOSE=1``: oneDNN prints each primitive's execution time (the kernels
  alone, without PyTorch's or oneDNN Graph's work around them);
- ONNX Runtime with its profiler: each node's kernel time.

Convolutions match by (in, out, kernel, stride, input size, residual sum fused or not); the
other operators by kind. Both sides fuse the residual addition and ReLU into the convolution
that ends each unit, so the rows compare like with like. Not every operator is a oneDNN
primitive on our side (the global average pool runs in PyTorch), so the totals cover almost,
not exactly, the same work. Meant for work that dominates its
own measurement (ResNet-50 at batch 32): on a ResNet-20 at batch 1 ONNX Runtime's profiler
costs about as much as the kernels it times, and ResNet-20's option-A shortcuts are separate
Slice/Pad/Add/Relu nodes there but fused convolutions here.

    python benchmarks/layer_times.py [--model resnet50] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from results_file import write_results
from resunit import create_model
from resunit.analysis import input_shape_of

WARM_CALLS = 3
MARK = "--- timed forward ---"

Key = tuple[Any, ...]
# The other operators, under one name for both sides (oneDNN primitive kind, ONNX op type).
OTHER_NAMES = {
    "pooling": "pooling",
    "MaxPool": "pooling",
    "AveragePool": "pooling",
    "GlobalAveragePool": "pooling",
    "matmul": "classifier (matmul)",
    "Gemm": "classifier (matmul)",
    "reorder": "layout reorder",
    "ReorderInput": "layout reorder",
    "ReorderOutput": "layout reorder",
}


def conv_key(cin: int, cout: int, kernel: int, stride: int, size: int, fused_sum: bool) -> Key:
    return ("conv", cin, cout, kernel, stride, size, fused_sum)


def describe(key: Key) -> str:
    if key[0] != "conv":
        return str(key[1])
    _, cin, cout, kernel, stride, size, fused_sum = key
    return f"conv {kernel}×{kernel}/{stride} {cin}→{cout} at {size}×{size}" + (
        " + residual" if fused_sum else ""
    )


# --- ours: oneDNN's verbose log ---------------------------------------------------------------


def run_ours(model_name: str, batch: int, threads: int) -> None:
    """The child process: warm the traced graph up, then run one forward after MARK."""
    from resunit.deploy import optimize, retain_freed_memory

    torch.set_num_threads(threads)
    retain_freed_memory()
    model = create_model(model_name).eval()
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    x = torch.randn(batch, *input_shape_of(model))
    for _ in range(WARM_CALLS):
        fast(x)
    print(MARK, flush=True)
    fast(x)
    sys.stdout.flush()


_CONV_SHAPE = re.compile(r"ic(\d+)oc(\d+)_ih(\d+)oh(\d+)kh(\d+)sh(\d+)")


def ours_times(model_name: str, batch: int, threads: int) -> dict[Key, list[float]]:
    # The field positions below are those of oneDNN's default verbose format.
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "ONEDNN_VERBOSE_TIMESTAMP": "0"}
    argv = [sys.executable, __file__, "--child", "--model", model_name, "--batch", str(batch)]
    out = subprocess.run(
        [*argv, "--threads", str(threads)], env=env, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    timed = lines[lines.index(MARK) + 1 :]
    times: dict[Key, list[float]] = collections.defaultdict(list)
    for line in timed:
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or fields[2:4] != ["primitive", "exec"]:
            continue
        kind, description, milliseconds = fields[5], fields[-2], float(fields[-1])
        shape = _CONV_SHAPE.search(description)
        if kind == "convolution" and shape:
            cin, cout, size, _, kernel, stride = map(int, shape.groups())
            post_ops = [f for f in fields if "attr-post-ops:" in f]  # e.g. sum+eltwise_relu
            fused_sum = any("sum" in f.split("attr-post-ops:")[1] for f in post_ops)
            key = conv_key(cin, cout, kernel, stride, size, fused_sum)
        else:
            key = ("other", OTHER_NAMES.get(kind, kind))
        times[key].append(milliseconds)
    if not times:
        raise SystemExit("no oneDNN primitive timings in the verbose log: its format changed?")
    return times


# --- ONNX Runtime: its profiler ---------------------------------------------------------------


def onnxruntime_times(model_name: str, batch: int, threads: int) -> dict[Key, list[float]]:
    import onnxruntime as ort

    from resunit.deploy import export_onnx

    model = create_model(model_name).eval()
    shape = input_shape_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", shape, dynamic_batch=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = torch.randn(batch, *shape).numpy()
        for _ in range(WARM_CALLS + 1):
            session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    times: dict[Key, list[float]] = collections.defaultdict(list)
    for event in events:
        if not (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")):
            continue
        if not start <= event["ts"] <= end:
            continue
        args = event["args"]
        inputs = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        outputs = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
        if args["op_name"] == "Conv" and len(inputs) >= 2 and outputs:
            (_, cin, size, _), (cout, _, kernel, _) = inputs[0], inputs[1]
            stride = size // outputs[0][2]
            fused_sum = len(inputs) == 4  # X, W, B and the residual to add
            key = conv_key(cin, cout, kernel, stride, size, fused_sum)
        else:
            key = ("other", OTHER_NAMES.get(args["op_name"], args["op_name"]))
        times[key].append(event["dur"] / 1000)
    if not times:
        raise SystemExit("no node timings in ONNX Runtime's profile: its format changed?")
    return times


# --- the table --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="JSON path (default results/layer_times-MODEL-bBATCH)")
    args = parser.parse_args()
    if args.child:
        run_ours(args.model, args.batch, args.threads)
        return 0
    ours = ours_times(args.model, args.batch, args.threads)
    peer = onnxruntime_times(args.model, args.batch, args.threads)
    rows = []
    for key in sorted(ours.keys() | peer.keys(), key=lambda k: -sum(ours.get(k, []))):
        a, b = ours.get(key, []), peer.get(key, [])
        rows.append(
            {
                "layer": describe(key),
                "count": [len(a), len(b)],
                "ours_ms": sum(a),
                "onnxruntime_ms": sum(b),
                "ours_over_onnxruntime": sum(a) / sum(b) if a and b else None,
            }
        )
    print(f"{args.model}, batch {args.batch}, {args.threads} threads: kernel time per forward")
    print(f"{'layer':<44} {'n':>5} {'ours ms':>9} {'ORT ms':>9} {'ours/ORT':>9}")
    for row in rows:
        ratio = row["ours_over_onnxruntime"]
        print(
            f"{row['layer']:<44} {'/'.join(map(str, row['count'])):>5} {row['ours_ms']:9.2f} "
            f"{row['onnxruntime_ms']:9.2f} {'-' if ratio is None else f'{ratio:.2f}':>9}"
        )
    total_ours = sum(r["ours_ms"] for r in rows)
    total_peer = sum(r["onnxruntime_ms"] for r in rows)
    print(
        f"{'total':<44} {'':>5} {total_ours:9.2f} {total_peer:9.2f} {total_ours / total_peer:9.2f}"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": rows,
        "total_ms": {"ours": total_ours, "onnxruntime": total_peer},
        "command": "python benchmarks/layer_times.py " + " ".join(sys.argv[1:]),
    }
    default = Path(__file__).parent / "results" / f"layer_times-{args.model}-b{args.batch}.json"
    print(f"\nwrote {write_results(args.out or default, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
