"""Where a forward's CPU time goes, thread by thread and library by library, sampled with perf.

`benchmarks/inference.py` says which variant is faster and `layer_times.py` compares the
kernels; neither sees the work around the kernels, which at ResNet-20 batch 1 (a forward of
~300 µs over ~20 layers) decides the race. Here a child process runs one variant in a loop and
Linux `perf` samples it from outside (no instrumentation inside): each sample is attributed to
the thread it hit and to the library its instruction lies in. oneDNN's kernels are generated at
run time, so they count as "JIT-compiled code"; oneDNN's own runtime and oneDNN Graph live
inside libtorch_cpu.so. The busy-waiting of a thread with nothing to do shows up in its
threading library (libgomp for PyTorch's OpenMP).

    python benchmarks/cpu_time_by_library.py [--model resnet20] [--batch 1] [--seconds 6]
        [--variants onednn_graph,onnxruntime_spin] [--threads 2]

Needs `perf` (linux-tools) and permission to sample another process (root, or
kernel.perf_event_paranoid ≤ 1). Writes benchmarks/results/cpu_time_by_library-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_file import write_results

RESULTS = Path(__file__).parent / "results"
READY = "ready"
SAMPLES_PER_SECOND = 4999  # an odd rate, so sampling does not lock onto a periodic loop
# A thread shown on its own: at least this share of all samples (the rest are idle helpers).
MIN_THREAD_SHARE = 0.05
TOP_SYMBOLS = 12


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="sampled per variant")
    parser.add_argument("--variants", default="onednn_graph,onnxruntime_spin")
    parser.add_argument("--out", type=Path, help="JSON path (default results/…-DATE.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the variant a child process runs
    return parser.parse_args()


# --- the child: one variant, called in a loop -------------------------------------------------


def run_child(args: argparse.Namespace) -> None:
    import torch

    from resunit import create_model, deploy
    from resunit.analysis import input_shape_of

    torch.set_num_threads(args.threads)
    deploy.retain_freed_memory()  # as benchmarks/inference.py and a server run
    model = create_model(args.model).eval()
    shape = input_shape_of(model)
    variants, skipped = deploy.build_variants(model, shape, [args.child], threads=args.threads)
    if args.child not in variants:
        raise SystemExit(f"{args.child} cannot run here: {skipped.get(args.child)}")
    run = variants[args.child].run
    x = torch.randn(args.batch, *shape)
    for _ in range(200):
        run(x)
    print(READY, flush=True)
    # Sampled from outside while this runs; a little longer than the sampling window.
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds + 2.0:
        run(x)
        calls += 1
    print(json.dumps({"microseconds_per_call": 1e6 * (time.perf_counter() - start) / calls}))


# --- the parent: sample each child, then count ------------------------------------------------


def category(library: str) -> str:
    """The library an instruction lies in, named for what it does here."""
    name = Path(library.strip("()")).name
    if name.startswith("perf-") or name.startswith("[JIT]") or name == "[unknown]":
        return "JIT-compiled code (oneDNN kernels)"
    if name.startswith("libtorch_cpu"):
        return "libtorch_cpu (oneDNN runtime and Graph, TorchScript, ATen)"
    if name.startswith("libgomp") or name.startswith("libiomp"):
        return "OpenMP runtime (mostly waiting at barriers)"
    if name.startswith("libc.so") or name.startswith("libc-"):
        return "C library (malloc/free, copies)"
    if name.startswith("libpython"):
        return "Python interpreter"
    if name.startswith("[kernel"):
        return "Linux kernel"
    if "onnxruntime" in name:
        return "ONNX Runtime (its kernels and executor)"
    return "other libraries"


def sample(args: argparse.Namespace, variant: str, perf: str, tmp: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", variant, "--model", args.model]
    argv += ["--batch", str(args.batch), "--threads", str(args.threads)]
    argv += ["--seconds", str(args.seconds)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != READY:
        raise SystemExit(f"the {variant} child did not start (exit {child.wait()})")
    data = tmp / f"{variant}.data"
    subprocess.run(
        [perf, "record", "-q", "-F", str(SAMPLES_PER_SECOND), "-p", str(child.pid),
         "-o", str(data), "--", "sleep", str(args.seconds)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    result = json.loads(child.stdout.readline())
    child.wait()
    script = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    symbols: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in script.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        tid, library = fields[0], fields[-1]
        per_thread[tid][category(library)] += 1
        symbol = " ".join(fields[2:-1]) or "?"
        symbols[tid][f"{symbol[:90]} [{Path(library.strip('()')).name}]"] += 1
    total = sum(sum(c.values()) for c in per_thread.values())
    main_thread = str(child.pid)
    threads = []
    for tid, counts in sorted(per_thread.items(), key=lambda t: -sum(t[1].values())):
        n = sum(counts.values())
        if n < MIN_THREAD_SHARE * total:
            continue
        threads.append(
            {
                "thread": "main" if tid == main_thread else f"worker {tid}",
                "samples": n,
                "share_by_category": {k: v / n for k, v in counts.most_common()},
                "top_symbols": {k: v / n for k, v in symbols[tid].most_common(TOP_SYMBOLS)},
            }
        )
    return {"variant": variant, **result, "samples": total, "threads": threads}


def table(results: list[dict[str, Any]]) -> str:
    """Per variant and thread: each category's share and its µs per forward."""
    lines = []
    for r in results:
        us = r["microseconds_per_call"]
        lines.append(f"\n**{r['variant']}**: {us:.0f} µs per forward while sampled\n")
        lines.append("| thread | where | share | µs per forward |")
        lines.append("|---|---|--:|--:|")
        for t in r["threads"]:
            for name, share in t["share_by_category"].items():
                if share >= 0.005:
                    lines.append(f"| {t['thread']} | {name} | {share:.1%} | {share * us:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("this benchmark samples with Linux perf, which is not installed here")
    started = dt.datetime.now(dt.timezone.utc)
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        results = [sample(args, v, perf, Path(tmp)) for v in variants]
    out = args.out or RESULTS / f"cpu_time_by_library-{started:%Y-%m-%dT%H%MZ}.json"
    payload = {
        "date": started.isoformat(timespec="seconds"),
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "seconds_sampled": args.seconds,
        "samples_per_second": SAMPLES_PER_SECOND,
        "cpu": _cpu_name(),
        "results": results,
        "command": "python benchmarks/cpu_time_by_library.py " + " ".join(sys.argv[1:]),
    }
    write_results(out, payload)
    when = f"{started:%Y-%m-%d %H:%M} UTC"
    print(f"# {args.model} batch {args.batch}, {args.threads} threads, {when}, {_cpu_name()}")
    print(table(results))
    for r in results:
        main_thread = next(t for t in r["threads"] if t["thread"] == "main")
        print(f"\n{r['variant']}, main thread, top symbols:")
        for name, share in main_thread["top_symbols"].items():
            print(f"  {share:6.1%}  {name}")
    print(f"\nwrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    main()
