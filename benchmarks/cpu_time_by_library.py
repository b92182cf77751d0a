"""Where a forward's CPU time goes, thread by thread and library by library, sampled with perf.

`benchmarks/inference.py` says which variant is faster and `layer_times.py` compares the
kernels; neither sees the work around the kernels, which at ResNet-20 batch 1 (a forward of
~300 µs over ~20 layers) decides the race. Here a child process runs one variant in a loop and
Linux `perf` samples it from outside (no instrumentation inside): each sample is attributed to
the thread it hit and to the library its instruction lies in. oneDNN's kernels are generated at
run time, so they count as generated code; oneDNN's own runtime and oneDNN Graph live inside
libtorch_cpu.so. The busy-waiting of a thread with nothing to do shows up in its threading
library (libgomp for PyTorch's OpenMP). With ``--callers`` perf also records call stacks, and
the time in malloc/free and C string functions is charged to the first caller outside the C
libraries (who allocates, per forward).

    python benchmarks/cpu_time_by_library.py [--model resnet20] [--batch 1] [--seconds 6]
        [--variants onednn_graph,onednn_plan,onnxruntime_spin] [--threads 2] [--callers]

Needs `perf` (linux-tools) and permission to sample another process (root, or
kernel.perf_event_paranoid ≤ 1). Writes benchmarks/results/cpu_time_by_library-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from machine import describe_machine
from results_file import write_results

RESULTS = Path(__file__).parent / "results"
READY = "ready"
SAMPLES_PER_SECOND = 4999  # an odd rate, so sampling does not lock onto a periodic loop
CALLER_SAMPLES_PER_SECOND = 999  # call stacks cost far more to record
SETUP_TIMEOUT_SECONDS = 600  # building a variant (export, trace) takes seconds, not minutes
# A worker thread shown on its own: at least this share of all samples (the main thread is
# always shown).
MIN_THREAD_SHARE = 0.05
TOP_SYMBOLS = 12
# perf script's line for one stack frame or sample: "<ip> <symbol, may hold spaces> (<library>)".
_FRAME = re.compile(r"^\s*(?P<ip>[0-9a-f]+)\s+(?P<symbol>.*?)\s*\((?P<library>[^()]*)\)\s*$")
# Time charged to the caller with --callers: the C library's allocator and string functions.
_C_LIBRARIES = ("libc.so", "libc-", "libstdc++", "ld-linux")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="sampled per variant")
    parser.add_argument("--variants", default="onednn_graph,onednn_plan,onnxruntime_spin")
    parser.add_argument("--callers", action="store_true", help="also sample call stacks")
    parser.add_argument("--out", type=Path, help="JSON path (default results/…-DATE.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the variant a child process runs
    return parser.parse_args()


# --- the child: one variant, called in a loop until told to stop ------------------------------


def run_child(args: argparse.Namespace) -> None:
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
    # Runs until the parent closes stdin, so perf always samples a live process; the two lines
    # the parent writes mark the sampled window, and the time per call is the window's own.
    marks: list[tuple[float, int]] = []
    calls = 0
    while True:
        run(x)
        calls += 1
        # Looking for a mark is a system call: every 16th call, so it barely shows.
        if calls % 16 or not select.select([sys.stdin], [], [], 0)[0]:
            continue
        if not sys.stdin.readline():
            return  # stdin closed: the parent is done
        marks.append((time.perf_counter(), calls))
        if len(marks) == 2:
            (start, first), (end, last) = marks
            window = {"microseconds_per_call": 1e6 * (end - start) / (last - first)}
            print(json.dumps(window), flush=True)


# --- the parent: sample each child, then count ------------------------------------------------


def category(library: str) -> str:
    """The library an instruction lies in, named for what it does here."""
    name = Path(library).name
    if name.startswith("perf-") or name.startswith("[JIT]"):
        return "generated code (oneDNN's kernels)"
    if name == "[unknown]" or not name:
        return "code perf could not place"
    if name.startswith("libtorch_cpu"):
        return "libtorch_cpu (oneDNN runtime and Graph, TorchScript, ATen)"
    if name.startswith("libdnnl") or name.startswith("onednn_plan"):
        return "oneDNN plan: the [onednn] extra's oneDNN runtime and the plan's C++"
    if name.startswith("libgomp") or name.startswith("libiomp"):
        return "OpenMP runtime (mostly waiting at barriers)"
    if name.startswith("libc.so") or name.startswith("libc-"):
        return "C library (malloc/free, copies, strings)"
    if name.startswith("libpython"):
        return "Python interpreter"
    if name.startswith("[kernel"):
        return "Linux kernel"
    if "onnxruntime" in name:
        return "ONNX Runtime (its kernels and executor)"
    return "other libraries"


class Sampled:
    """A child process running one variant, sampled by perf; cleaned up whatever happens."""

    def __init__(self, args: argparse.Namespace, variant: str) -> None:
        argv = [sys.executable, __file__, "--child", variant, "--model", args.model]
        argv += ["--batch", str(args.batch), "--threads", str(args.threads)]
        self.variant = variant
        self.child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __enter__(self) -> Sampled:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()  # the child's loop ends
        try:
            self.child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    def wait_until_ready(self) -> None:
        assert self.child.stdout is not None
        deadline = time.monotonic() + SETUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not select.select([self.child.stdout], [], [], 1.0)[0]:
                continue
            line = self.child.stdout.readline()
            if line.strip() == READY:
                return
            if not line:  # the child ended (its error went to stderr)
                raise SystemExit(f"the {self.variant} child ended before its loop")
        raise SystemExit(f"the {self.variant} child took over {SETUP_TIMEOUT_SECONDS} s to start")

    def mark(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.write("mark\n")
        self.child.stdin.flush()

    def microseconds_per_call(self) -> float:
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.variant} child died in its loop")
        return float(json.loads(line)["microseconds_per_call"])


def sample(args: argparse.Namespace, variant: str, perf: str, tmp: Path) -> dict[str, Any]:
    data = tmp / f"{variant}.data"
    _progress(f"building {variant} in a child process")
    with Sampled(args, variant) as sampled:
        sampled.wait_until_ready()
        _progress(f"sampling {variant} for {args.seconds:g} s")
        rate = CALLER_SAMPLES_PER_SECOND if args.callers else SAMPLES_PER_SECOND
        record = [perf, "record", "-q", "-F", str(rate), "-p", str(sampled.child.pid)]
        if args.callers:
            record += ["--call-graph", "dwarf,16384"]
        recorder = subprocess.Popen(
            [*record, "-o", str(data), "--", "sleep", str(args.seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.5)  # perf attaches within this; the window starts after it
        sampled.mark()
        time.sleep(args.seconds - 1.0)
        sampled.mark()  # ends the window before perf stops sampling
        microseconds = sampled.microseconds_per_call()
        _, perf_errors = recorder.communicate()
        if recorder.returncode != 0:
            said = (perf_errors.strip().splitlines() or [f"exit {recorder.returncode}"])[-1]
            raise SystemExit(
                f"perf could not sample the child ({said}): run as root or set "
                "kernel.perf_event_paranoid to 1 or less"
            )
        main_thread = str(sampled.child.pid)  # Popen runs Python itself: its pid is its main tid
    _progress("reading the samples")
    # --no-inline: resolving inlined frames runs addr2line per address, minutes per second of
    # call stacks sampled.
    script = subprocess.run(
        [perf, "script", "--no-inline", "-i", str(data), "-F", "tid,time,ip,sym,dso"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return summarize(variant, script, main_thread, microseconds, rate)


def _samples(script: str) -> Iterator[tuple[str, float, list[re.Match[str]]]]:
    """(thread id, time, frames innermost first) of each sample in ``perf script`` output.

    A sample starts on an unindented line "<tid> <time>:", followed on the same line by its
    one frame or, with call stacks, by tab-indented frame lines."""
    current: tuple[str, float, list[re.Match[str]]] | None = None
    for line in script.splitlines():
        if line.startswith("\t"):
            frame = _FRAME.match(line)
            if current is not None and frame:
                current[2].append(frame)
            continue
        if not line.strip():
            continue
        if current is not None and current[2]:
            yield current
        tid, stamp, *rest = line.split(maxsplit=2)
        frame = _FRAME.match(rest[0]) if rest else None
        current = (tid, float(stamp.rstrip(":")), [frame] if frame else [])
    if current is not None and current[2]:
        yield current


def _in_c_library(library: str) -> bool:
    # perf names a frame inlined into its caller "(inlined)": it belongs to the frame below.
    return library == "inlined" or Path(library).name.startswith(_C_LIBRARIES)


def _progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}…", file=sys.stderr, flush=True)


def summarize(
    variant: str, script: str, main_thread: str, microseconds_per_call: float, rate: int
) -> dict[str, Any]:
    """Count perf's samples per thread and library, and turn counts into µs per forward."""
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    symbols: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    allocating: collections.Counter[str] = collections.Counter()
    times: list[float] = []
    for tid, stamp, frames in _samples(script):
        times.append(stamp)
        top = frames[0]
        per_thread[tid][category(top["library"])] += 1
        symbols[tid][f"{top['symbol'] or '?'} [{Path(top['library']).name}]"] += 1
        if tid == main_thread and len(frames) > 1 and _in_c_library(top["library"]):
            caller = next((f for f in frames[1:] if not _in_c_library(f["library"])), None)
            if caller:
                allocating[f"{caller['symbol']} [{Path(caller['library']).name}]"] += 1
    seconds = max(times) - min(times) if len(times) > 1 else 0.0
    calls = seconds * 1e6 / microseconds_per_call if seconds else 0.0
    # µs per forward from absolute counts: a thread that sleeps gets fewer samples, not a share.
    per_forward = 1e6 / rate / calls if calls else 0.0
    total = sum(sum(c.values()) for c in per_thread.values())
    threads = []
    by_thread = sorted(  # the main thread first, then the busiest
        per_thread.items(), key=lambda item: (item[0] != main_thread, -sum(item[1].values()))
    )
    for tid, counts in by_thread:
        samples = sum(counts.values())
        if tid != main_thread and samples < MIN_THREAD_SHARE * total:
            continue
        threads.append(
            {
                "thread": "main" if tid == main_thread else f"worker {tid}",
                "samples": samples,
                "microseconds_per_forward": {
                    name: count * per_forward for name, count in counts.most_common()
                },
                "top_symbols": {
                    name: count * per_forward
                    for name, count in symbols[tid].most_common(TOP_SYMBOLS)
                },
            }
        )
    result = {
        "variant": variant,
        "microseconds_per_call": microseconds_per_call,
        "seconds_sampled": seconds,
        "samples": total,
        "threads": threads,
    }
    if allocating:
        result["main_thread_c_library_time_by_caller"] = {
            name: count * per_forward for name, count in allocating.most_common(TOP_SYMBOLS)
        }
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Per variant and thread: each category's µs per forward and share of the forward."""
    lines = []
    for result in results:
        forward = result["microseconds_per_call"]
        lines.append(f"\n**{result['variant']}**: {forward:.0f} µs per forward while sampled\n")
        lines.append("| thread | where | µs per forward | share |")
        lines.append("|---|---|--:|--:|")
        for thread in result["threads"]:
            for name, spent in thread["microseconds_per_forward"].items():
                if spent >= 0.005 * forward:
                    lines.append(
                        f"| {thread['thread']} | {name} | {spent:.0f} | {spent / forward:.1%} |"
                    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("this benchmark samples with Linux perf, which is not installed here")
    if args.seconds < 2:
        raise SystemExit("--seconds must be at least 2")
    started = dt.datetime.now(dt.timezone.utc)
    machine = describe_machine(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        results = [sample(args, variant, perf, Path(tmp)) for variant in variants]
    kind = "-callers" if args.callers else ""
    out = args.out or RESULTS / f"cpu_time_by_library-{started:%Y-%m-%dT%H%MZ}{kind}.json"
    payload = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine.to_dict(),
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "samples_per_second": CALLER_SAMPLES_PER_SECOND if args.callers else SAMPLES_PER_SECOND,
        "results": results,
        "command": "python benchmarks/cpu_time_by_library.py " + " ".join(sys.argv[1:]),
    }
    write_results(out, payload)
    when = f"{started:%Y-%m-%d %H:%M} UTC"
    print(f"# {args.model} batch {args.batch}, {args.threads} threads, {when}")
    print(machine.describe())
    print(table(results))
    for result in results:
        main_thread = next(t for t in result["threads"] if t["thread"] == "main")
        print(f"\n{result['variant']}, main thread, top symbols (µs per forward):")
        for name, spent in main_thread["top_symbols"].items():
            print(f"  {spent:6.1f}  {name[:150]}")
        callers = result.get("main_thread_c_library_time_by_caller", {})
        if callers:
            print(f"{result['variant']}, main thread, C library time by caller (µs per forward):")
            for name, spent in callers.items():
                print(f"  {spent:6.1f}  {name[:150]}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
