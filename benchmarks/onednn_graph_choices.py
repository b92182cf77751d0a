"""Two choices inside ``optimize(compile="onednn_graph")``, each against its alternative.

1. Layout: the traced graph on NHWC (channels_last) weights and input, or on NCHW.
2. Option-A shortcuts (ResNet-20 and other CIFAR nets): as the exact 1×1 identity convolution
   that ``pad_shortcuts_as_convolutions`` makes (fused into a oneDNN Graph partition), or as
   the model's own strided slice + zero pad (two framework calls outside the partitions).

Variants, all BN-folded and traced with oneDNN Graph fusion, run interleaved in one process
(``resunit.deploy.measure_interleaved``: blocks of ~50 ms, the first call of each block
untimed), median of ``--repeats`` rounds, on the same random NCHW input (the channels_last
variants convert it on each call, as a caller's NCHW batch would be):

- ``nchw_slice``: NCHW, shortcuts as slice + pad (the variant before 2026-11-29);
- ``cl_slice``: channels_last, shortcuts as slice + pad;
- ``cl_conv``: channels_last, shortcuts as convolutions — what ``optimize`` now builds.

    python benchmarks/onednn_graph_choices.py [--models resnet20,resnet50] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys

import torch

from results_file import write_results
from resunit import create_model
from resunit.analysis import input_shape_of
from resunit.deploy import (
    OneDnnGraphModel,
    fold_batchnorm,
    measure_interleaved,
    onednn_graph_works,
    optimize,
    relative_difference,
    retain_freed_memory,
)


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    folded = fold_batchnorm(model)
    return {
        "nchw_slice": OneDnnGraphModel(folded, channels_last=False).eval(),
        "cl_slice": OneDnnGraphModel(
            fold_batchnorm(model).to(memory_format=torch.channels_last), channels_last=True
        ).eval(),
        "cl_conv": optimize(model, channels_last=True, compile="onednn_graph"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet50")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/onednn_graph_choices.json")
    args = parser.parse_args()
    works, why = onednn_graph_works()
    if not works:
        print(f"oneDNN Graph does not work here: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as resunit bench and a server do
    rows = []
    print(f"{'model':<10} {'batch':>5} {'variant':<11} {'img/s':>8} {'× nchw_slice':>12}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name).eval()
        fast = variants(model)
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, *input_shape_of(model))
            with torch.no_grad():
                expected = model(x)
                # Every variant computes the same function (and is traced and warm from here).
                differences = {k: relative_difference(v(x), expected) for k, v in fast.items()}
            runners = {k: functools.partial(v, x) for k, v in fast.items()}
            probe = measure_interleaved(runners, batch, repeats=1, warmup=0)
            # Blocks of ~50 ms per variant and round, as benchmarks/inference.py times them.
            block = {k: max(2, min(21, round(0.05 / t.median_seconds))) for k, t in probe.items()}
            timings = measure_interleaved(runners, batch, repeats=args.repeats, block=block)
            base = timings["nchw_slice"].images_per_second
            for key, timing in timings.items():
                rate = timing.images_per_second
                print(f"{name:<10} {batch:>5} {key:<11} {rate:8.1f} {rate / base:12.2f}")
                rows.append(
                    dict(
                        model=name,
                        batch=batch,
                        variant=key,
                        images_per_second=rate,
                        over_nchw_slice=rate / base,
                        max_relative_difference=differences[key],
                        seconds=timing.seconds,
                    )
                )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
        "command": "python " + " ".join(sys.argv),
    }
    print(f"\nwrote {write_results(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
