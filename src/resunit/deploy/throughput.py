"""Throughput of the ways of running one network, side by side in one process.

:func:`build_variants` makes each variant, :func:`compare_variants` times them interleaved
and checks every output against the eager model's.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.deploy.folding import relative_difference
from resunit.deploy.inference import compile_works, onednn_graph_works, optimize
from resunit.deploy.int8 import pt2e_available, quantize, quantize_pt2e
from resunit.deploy.onednn_plan import onednn_plan_works
from resunit.deploy.onnx_export import (
    OnnxRuntimeModel,
    _scratch_dir,
    export_onnx,
    onnx_available,
)
from resunit.errors import ConfigError


@dataclass
class Variant:
    """One way of running the same network: a name, what it is, and ``run(x) → logits``."""

    name: str
    description: str
    run: Callable[[Tensor], Tensor]
    input_layout: str = "nchw"
    # Its threads busy-wait after a call, taking the cores from whatever runs next; the
    # measurement pauses after it (see measure_interleaved).
    spinning: bool = False


VARIANTS = (
    "eager",
    "folded",
    "folded_cl",
    "compiled",
    "onednn_graph",
    "onednn_plan",
    "onnxruntime",
    "onnxruntime_spin",
    "int8",
    "int8_spin",
    "int8_pt2e",
)
# What `resunit bench` compares by default: every float32 way of running the model.
FLOAT32_VARIANTS = VARIANTS[:8]
VARIANT_DESCRIPTIONS = {
    "eager": "PyTorch eager, NCHW float32, BatchNorm not folded",
    "folded": "BatchNorm folded into the convs, NCHW",
    "folded_cl": "BatchNorm folded, channels_last (NHWC)",
    "compiled": "folded + channels_last + torch.compile (freezing: fused conv+ReLU/add)",
    "onednn_graph": "folded + channels_last + TorchScript trace with oneDNN Graph fusion",
    "onednn_plan": "folded + channels_last input, fused oneDNN primitives called in a row from C",
    "onnxruntime": "ONNX Runtime float32 on the exported folded graph",
    "onnxruntime_spin": "the same, worker threads spinning between ops (ORT's default)",
    "int8": "ONNX Runtime int8 (static, per-channel, QDQ)",
    "int8_spin": "the same int8 file, worker threads spinning (ORT's default)",
    "int8_pt2e": "PyTorch int8: PT2E X86 Inductor quantizer + torch.compile (torchao)",
}


# The compiled float32 variants: optimize's compile= value, the check that it works here, and
# what to call it when it does not.
_COMPILED: dict[str, tuple[bool | str, Callable[[], tuple[bool, str]], str]] = {
    "compiled": (True, compile_works, "torch.compile"),
    "onednn_graph": ("onednn_graph", onednn_graph_works, "oneDNN Graph fusion"),
    "onednn_plan": ("onednn_plan", onednn_plan_works, "a oneDNN plan"),
}


def build_variants(
    model: nn.Module,
    input_shape: Sequence[int],
    names: Sequence[str] = FLOAT32_VARIANTS,
    *,
    threads: int | None = None,
    calibration_batches: Sequence[Tensor] | None = None,
) -> tuple[dict[str, Variant], dict[str, str]]:
    """Build the requested inference variants of ``model``; returns (variants, skipped→why).

    A variant that cannot run here (no ONNX extra, no compiler for ``torch.compile``) is
    skipped with its reason instead of failing the whole comparison.
    """
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(
            f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}"
        )
    eager = copy.deepcopy(model).eval()
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}

    def add(name: str, run: Callable[[Tensor], Tensor], spinning: bool | None = None) -> None:
        if spinning is None:  # a PyTorch variant
            spinning = openmp_threads_spin()
        variants[name] = Variant(name, VARIANT_DESCRIPTIONS[name], run, spinning=spinning)

    # This call's ONNX files, shared by both thread settings. ONNX Runtime reads a file when
    # its session starts, so the folder goes when the variants are built. (Named after
    # id(model) they were not this call's: a freed model's id comes back with the next one.)
    with tempfile.TemporaryDirectory(dir=_scratch_dir(), prefix="bench-") as folder:
        files = Path(folder)
        for name in names:
            if name == "eager":
                add(name, _no_grad(eager))
            elif name == "folded":
                add(name, optimize(eager, channels_last=False))
            elif name == "folded_cl":
                add(name, optimize(eager, channels_last=True))
            elif name in _COMPILED:
                compiler, works_here, failure = _COMPILED[name]
                works, why = works_here()
                if works:
                    add(name, optimize(eager, channels_last=True, compile=compiler))
                else:
                    skipped[name] = f"{failure} does not work here ({why})"
            elif name in ("onnxruntime", "onnxruntime_spin", "int8", "int8_spin"):
                # One file per model for both thread settings: float32 exported, int8 quantized.
                spin = name.endswith("_spin")
                if not onnx_available():
                    skipped[name] = "the [onnx] extra is not installed"
                elif name.startswith("onnxruntime"):
                    path = files / "model.onnx"
                    if not path.exists():
                        export_onnx(eager, path, input_shape, dynamic_batch=True)
                    add(name, OnnxRuntimeModel(path, threads, spin=spin), spinning=spin)
                elif calibration_batches is None:
                    skipped[name] = "no calibration batches given"
                else:
                    path = files / "model.int8.onnx"
                    if not path.exists():  # quantize's own session is the non-spinning one
                        quantized = quantize(eager, calibration_batches, path, threads=threads)
                        if not spin:
                            add(name, quantized, spinning=False)
                            continue
                    add(name, OnnxRuntimeModel(path, threads, spin=spin), spinning=spin)
            elif name == "int8_pt2e":
                if not pt2e_available():
                    skipped[name] = "torchao is not installed"
                elif calibration_batches is None:
                    skipped[name] = "no calibration batches given"
                else:
                    add(name, quantize_pt2e(eager, calibration_batches))
    return variants, skipped


def openmp_threads_spin() -> bool:
    """Whether PyTorch's OpenMP threads busy-wait after each parallel region, as GNU OpenMP's
    default wait policy has them do for a while (unless ``OMP_WAIT_POLICY=PASSIVE``).

    Like ONNX Runtime's spinning threads, they then take the cores from whatever runs next:
    in one process, ONNX Runtime at ResNet-20 batch 1 measured 2170 img/s when it always ran
    right after ``onednn_graph`` and 3190 when another variant came between (2026-11-29).
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def _no_grad(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    return run


@dataclass
class Timing:
    """Repeated timings of one variant on one batch size."""

    name: str
    batch: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_seconds


def measure_interleaved(
    runners: dict[str, Callable[[], Any]],
    batch: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    block: int | dict[str, int] = 2,
    spinning: Iterable[str] = (),
) -> dict[str, Timing]:
    """Time every runner ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Each round runs every variant once, starting from a different one each round, so slow
    phases of a shared machine hit all variants alike; report medians and compare ratios.
    Within a round a variant runs ``block`` calls back to back (a number, or one per variant)
    and only the calls after the first are timed, their mean being the round's sample: the
    first one refills the caches and wakes the threads that the previous variant left cold,
    which would otherwise be charged to whichever variant comes next (a model in service runs
    call after call). Runners named in ``spinning`` keep their threads
    busy-waiting after a call, taking the cores from the next variant: a short pause follows
    their block (we measured the interference gone after 10-50 ms on 2 cores). That is ONNX
    Runtime with spinning threads and, by default, every PyTorch variant too
    (:func:`openmp_threads_spin`).
    """
    names = list(runners)
    blocks = block if isinstance(block, dict) else dict.fromkeys(names, block)
    if min(blocks.values()) < 2:
        raise ConfigError("block must be at least 2: its first call is never timed")
    spinning = set(spinning)
    timings = {name: Timing(name, batch) for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runners[name]()  # warms up, untimed
            start = time.perf_counter()
            for _ in range(blocks[name] - 1):
                runners[name]()
            elapsed = (time.perf_counter() - start) / (blocks[name] - 1)
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
            if name in spinning:
                time.sleep(0.1)
    return timings


@dataclass(frozen=True)
class PairedRatio:
    """How many times faster one variant ran than another: the median of round-by-round
    ratios, and a confidence interval for that median."""

    median: float
    low: float
    high: float
    confidence: float  # the interval's exact coverage, at least the one asked for if possible
    rounds: int

    def describe(self) -> str:
        """One line for a report: ``1.03× (96% interval 0.98-1.09, 9 rounds)``."""
        return (
            f"{self.median:.2f}× ({self.confidence:.0%} interval "
            f"{self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"
        )


def paired_ratio(
    reference_seconds: Sequence[float],
    candidate_seconds: Sequence[float],
    confidence: float = 0.9,
) -> PairedRatio:
    """``reference time / candidate time`` per round (above 1: the candidate is faster).

    :func:`measure_interleaved` runs every variant once per round, so the two times of one
    round were taken under the same conditions of a shared machine: their ratio cancels the
    slow and fast phases that move both medians. The interval is distribution-free: the k-th
    smallest and k-th largest of n ratios bracket their median with probability
    1 − 2·P(Binomial(n, ½) ≤ k − 1), and k is the largest rank that keeps that at least
    ``confidence`` (too few rounds for it: the smallest and largest ratio, with the coverage
    they have).

    The interval speaks for one run: it treats the rounds as independent draws, and the state
    of a shared machine hours later is not among them (ResNet-20 at batch 1 measured 0.81-1.02×
    ONNX Runtime over one day, each run's interval narrower than that). Picking the faster of
    several variants on the same rounds also leans the interval slightly its way.
    """
    if len(reference_seconds) != len(candidate_seconds) or not reference_seconds:
        raise ConfigError("paired_ratio needs the same number of rounds, at least one, of each")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie between 0 and 1, not {confidence}")
    ratios = sorted(r / c for r, c in zip(reference_seconds, candidate_seconds, strict=True))
    n = len(ratios)
    # [k-th smallest, k-th largest] misses the median only when fewer than k of the ratios fall
    # on one side of it: coverage 1 − 2·P(B ≤ k − 1), B ~ Binomial(n, ½). Widen from k = 1
    # while the next rank keeps enough.
    k, tail = 1, 1  # tail = 2ⁿ · P(B ≤ k − 1), the sum of C(n, i) for i < k
    while k + 1 <= (n + 1) // 2 and 1 - 2 * (tail + math.comb(n, k)) / 2**n >= confidence:
        tail += math.comb(n, k)
        k += 1
    return PairedRatio(
        median=statistics.median(ratios),
        low=ratios[k - 1],
        high=ratios[n - k],
        confidence=1 - 2 * tail / 2**n,
        rounds=n,
    )


def compare_variants(
    variants: dict[str, Variant],
    x: Tensor,
    reference: Tensor,
    *,
    repeats: int,
    warmup: int = 2,
    block_seconds: float = 0.05,
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time every variant on ``x`` (see :func:`measure_interleaved`) and check its output.

    Each variant's block holds as many calls as fill about ``block_seconds`` (2 to 21 calls):
    fast variants are timed over many consecutive calls, slow ones over one after a warm-up.
    Returns the timings and each variant's largest difference from ``reference`` relative to
    the output's scale. The output is taken from the first call, which compiles or plans and
    is never timed.
    """
    with torch.no_grad():
        differences = {n: relative_difference(v.run(x), reference) for n, v in variants.items()}
    runners = {name: (lambda v=v: v.run(x)) for name, v in variants.items()}
    blocks = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        per_call = time.perf_counter() - start
        blocks[name] = 1 + min(20, max(1, round(block_seconds / per_call)))
    spinning = [name for name, v in variants.items() if v.spinning]
    timings = measure_interleaved(
        runners, len(x), repeats=repeats, warmup=warmup, block=blocks, spinning=spinning
    )
    return timings, differences


__all__ = [
    "FLOAT32_VARIANTS",
    "VARIANTS",
    "VARIANT_DESCRIPTIONS",
    "PairedRatio",
    "Timing",
    "Variant",
    "build_variants",
    "compare_variants",
    "measure_interleaved",
    "openmp_threads_spin",
    "paired_ratio",
]
