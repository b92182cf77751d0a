"""Two inference variants in long rounds: thousands of calls each, taking turns.

`inference.py` interleaves every variant in short blocks, which keeps a shared VM's slow
phases fair to all of them but also wakes each runtime's threads from cold often. A model in
service runs call after call; here each variant does that for a whole round (default 2000
calls) before the other takes over, and each round's ratio is taken as in `inference.py`.

    python benchmarks/long_rounds.py [--model resnet20] [--batch 1] [--calls 2000]
        [--rounds 7] [--variants onednn_plan,onnxruntime_spin] [--threads 2]

Writes benchmarks/results/long_rounds-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import torch

from machine import cpu_load, describe_machine
from results_file import write_results
from resunit import deploy
from resunit.models import create_model, default_input_shape

RESULTS = Path(__file__).parent / "results"
PAUSE_SECONDS = 0.2  # lets a spinning runtime's threads go quiet before the other one starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default="onednn_plan,onnxruntime_spin")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    deploy.retain_freed_memory()
    model = create_model(args.model).eval()
    shape = default_input_shape(args.model)
    names = [n for n in args.variants.split(",") if n]
    variants, skipped = deploy.build_variants(model, shape, names, threads=args.threads)
    for name, why in skipped.items():
        raise SystemExit(f"{name} cannot run here: {why}")
    x = torch.randn(args.batch, *shape)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    load_before = cpu_load()
    for round_index in range(args.rounds + 1):  # the first round warms up, untimed
        for name in names[round_index % 2 :] + names[: round_index % 2]:
            run = variants[name].run
            run(x)
            start = time.perf_counter()
            for _ in range(args.calls):
                run(x)
            if round_index:
                seconds[name].append((time.perf_counter() - start) / args.calls)
            time.sleep(PAUSE_SECONDS)
    reference = names[-1]
    ratios = {
        name: [ref / own for own, ref in zip(seconds[name], seconds[reference], strict=True)]
        for name in names
    }
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds of "
          f"{args.calls} calls (µs per call; ratio to {reference}, round by round)")  # fmt: skip
    for name in names:
        per_call = [s * 1e6 for s in seconds[name]]
        print(
            f"  {name:18} {min(per_call):7.1f}-{max(per_call):7.1f} µs   "
            f"× {reference}: median {statistics.median(ratios[name]):.2f} "
            f"({min(ratios[name]):.2f}-{max(ratios[name]):.2f})"
        )
    date = dt.datetime.now(dt.timezone.utc)
    out = args.out or RESULTS / f"long_rounds-{date:%Y-%m-%dT%H%MZ}.json"
    result = {
        "date": date.isoformat(timespec="seconds"),
        "machine": describe_machine(args.threads).to_dict(),
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "calls_per_round": args.calls,
        "load_average_before": load_before,
        "microseconds_per_call": {n: [s * 1e6 for s in seconds[n]] for n in names},
        "ratio_to_reference_by_round": ratios,
        "reference": reference,
        "command": "python benchmarks/long_rounds.py "
        f"--model {args.model} --batch {args.batch} --calls {args.calls} "
        f"--rounds {args.rounds} --variants {args.variants} --threads {args.threads}",
    }
    print(f"wrote {write_results(out, result)}")


if __name__ == "__main__":
    main()
