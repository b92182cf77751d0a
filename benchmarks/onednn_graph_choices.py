"""The choices inside ``optimize(compile="onednn_graph")``, each measured against the
variant without it.

Each variant adds one choice to the one before; the last is what ``optimize`` builds:

1. ``nchw``: NCHW weights and input; option-A shortcuts as the model's strided slice + zero
   pad; the pool + classifier head as the model has it; the process-wide oneDNN fusion switch
   held on around every call. (``optimize`` as of 2026-11-28, but with one trace per input
   shape, as now.)
2. ``+channels_last``: NHWC weights and input.
3. ``+shortcut_conv``: option-A shortcuts (ResNet-20 and other CIFAR nets) as the exact 1×1
   identity convolutions of ``pad_shortcuts_as_convolutions``, fused into oneDNN Graph
   partitions instead of two framework calls outside them.
4. ``+switch_once``: the fusion switch on only while a shape is traced and warmed up; a warm
   graph keeps its fused plan without it, and calls skip the thread-safe hold on it.
5. ``+head_conv``: the global pool + classifier traced as one whole-map convolution (a fused
   partition) where that is cheap (``_HeadAsConvolution``; not for ResNet-50, whose
   2048 × 1000 × 7 × 7 head convolution would cost more than it saves).
6. ``+cache_pieces``: a batch whose residual units' tensors would fill the last-level cache
   four times over runs in cache-sized pieces (``cache_sized_batch``: ResNet-50 at batch 32,
   in pieces of 4 on a 32 MB L3).

All run interleaved in one process (``resunit.deploy.measure_interleaved``: blocks of ~50 ms,
the first call of each block untimed), median of ``--repeats`` rounds, on the same random NCHW
input (channels_last variants convert it on each call, as a caller's NCHW batch would be).

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
    pad_shortcuts_as_convolutions,
    relative_difference,
    retain_freed_memory,
)
from resunit.deploy.inference import _onednn_fusion  # the per-call hold +switch_once removed


class _WholeBatch(OneDnnGraphModel):
    split_large_batches = False


class _PoolHead(_WholeBatch):
    head_as_convolution = False


class _SwitchEveryCall(_PoolHead):
    # As optimize did until 2026-11-29: the thread-safe hold on the process-wide switch
    # around every call.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _onednn_fusion():
            return super().forward(x)


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    def folded(channels_last: bool, shortcut_conv: bool) -> torch.nn.Module:
        fast = fold_batchnorm(model)
        if channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        return pad_shortcuts_as_convolutions(fast) if shortcut_conv else fast

    return {
        "nchw": _SwitchEveryCall(folded(False, False), channels_last=False).eval(),
        "+channels_last": _SwitchEveryCall(folded(True, False), channels_last=True).eval(),
        "+shortcut_conv": _SwitchEveryCall(folded(True, True), channels_last=True).eval(),
        "+switch_once": _PoolHead(folded(True, True), channels_last=True).eval(),
        "+head_conv": _WholeBatch(optimize(model, compile="onednn_graph").model, True).eval(),
        "+cache_pieces": optimize(model, channels_last=True, compile="onednn_graph"),
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
    print(f"{'model':<9} {'batch':>5} {'variant':<15} {'img/s':>8} {'× nchw':>7} {'× previous':>9}")
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
            base = previous = timings["nchw"].images_per_second
            for key, timing in timings.items():
                rate = timing.images_per_second
                step, previous = rate / previous, rate
                print(f"{name:<9} {batch:>5} {key:<15} {rate:8.1f} {rate / base:7.2f} {step:9.2f}")
                rows.append(
                    dict(
                        model=name,
                        batch=batch,
                        variant=key,
                        images_per_second=rate,
                        over_nchw=rate / base,
                        over_previous=step,
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
