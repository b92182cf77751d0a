"""What this machine can do at most: theoretical float32 peak and a measured large GEMM.

The peak is cores × clock × FLOP per cycle, where FLOP per cycle comes from the widest vector
unit the CPU reports: AVX-512 = 16 float32 lanes, AVX2 = 8; an FMA is 2 FLOP. Full-width FMA
units per core: two on Intel Xeon Scalable since Skylake-SP Gold/Platinum (every Sapphire Rapids
part) and on AMD Zen 5 EPYC (CPU family 26); one on AMD Zen 4 (family 25), whose two 256-bit
units take an AVX-512 FMA in two halves. A virtual machine does not expose the unit count, so
that part is an assumption and is printed with the result. Nor does it expose the turbo range:
the clock is then the nominal one, and a measured GEMM can exceed the "peak" (seen on both
Sapphire Rapids and Zen 5): "% of the measured GEMM" is the realistic ceiling.
"""

from __future__ import annotations

import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FMA_UNITS_PER_CORE = 2  # Intel Xeon Scalable, AMD Zen 5: see above


@dataclass
class Machine:
    cpu: str
    cores: int
    threads_used: int
    clock_ghz: float
    clock_source: str
    vector_bits: int
    flags: list[str]
    fma_units_per_core: int

    @property
    def flop_per_cycle_per_core(self) -> int:
        lanes = self.vector_bits // 32
        return lanes * 2 * self.fma_units_per_core

    def peak_gflops(self, threads: int | None = None) -> float:
        """Theoretical float32 peak of ``threads`` cores (default: the threads used)."""
        cores = min(threads or self.threads_used, self.cores)
        return cores * self.clock_ghz * self.flop_per_cycle_per_core

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.clock_ghz:.2f} GHz ({self.clock_source}), "
            f"{'AVX-512' if self.vector_bits == 512 else 'AVX2'}: "
            f"{self.vector_bits // 32} float32 lanes × 2 (FMA) × {self.fma_units_per_core} FMA "
            f"units = {self.flop_per_cycle_per_core} FLOP/cycle/core → float32 peak "
            f"{self.peak_gflops():.0f} GFLOP/s on {self.threads_used} threads"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flop_per_cycle_per_core"] = self.flop_per_cycle_per_core
        out["peak_gflops"] = self.peak_gflops()
        out["flags"] = [f for f in self.flags if f.startswith(("avx", "amx", "fma"))]
        return out


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def describe_machine(threads: int) -> Machine:
    info = _lscpu()
    flags = info.get("Flags", "").split()
    cores = int(info.get("Core(s) per socket", "0") or 0) * int(info.get("Socket(s)", "1") or 1)
    cores = cores or (torch.get_num_threads())
    if info.get("CPU max MHz"):
        clock, source = float(info["CPU max MHz"]) / 1000, "lscpu max MHz"
    else:
        # Virtual machines often hide the frequency range; the kernel's TSC calibration
        # (BogoMIPS = 2 × TSC MHz on x86) gives the nominal clock.
        clock, source = float(info.get("BogoMIPS", "0") or 0) / 2000, "nominal (BogoMIPS/2)"
    model = info.get("Model name") or platform.processor() or "unknown CPU"
    if not clock:
        match = re.search(r"@ ([\d.]+)GHz", model)
        clock, source = (float(match.group(1)), "model name") if match else (0.0, "unknown")
    vector_bits = 512 if "avx512f" in flags else 256
    fma_units = FMA_UNITS_PER_CORE
    if info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25":
        fma_units = 1 if vector_bits == 512 else 2  # Zen 4 halves AVX-512; Zen 3 is AVX2 × 2
    return Machine(model, cores, threads, clock, source, vector_bits, flags, fma_units)


def measure_gemm_gflops(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Best float32 GFLOP/s of a ``size``³ matrix product in each of PyTorch's two CPU
    libraries: MKL (``torch.mm``) and oneDNN (the same product as a channels_last 1×1
    convolution: ``size`` channels in and out over 16 images of 16×16 = 4096 pixels).

    Both, because neither is the ceiling everywhere: on an AMD EPYC (Zen 5, 2026-11-29 13:48
    UTC) MKL reached 219 GFLOP/s and oneDNN 459 (MKL does not take its AVX-512 path on AMD
    CPUs); on Intel they were within a few percent of each other. The faster one is what the
    cores really deliver. (16 images, not one: PyTorch sends a one-image 1×1 convolution to
    its own slow kernel rather than to oneDNN when it runs on one thread.)
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    images = torch.randn(16, size, 16, 16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(size, size, 1, 1).contiguous(memory_format=torch.channels_last)
    products = {  # name: (the product, its FLOP)
        "mkl": (lambda: torch.mm(a, b), 2 * size**3),
        "onednn": (lambda: torch.nn.functional.conv2d(images, weight), 2 * size * size * 4096),
    }
    rates = {}
    with torch.no_grad():
        for name, (product, flop) in products.items():
            product()  # warm-up: thread pool, page faults, oneDNN's kernel generation
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
            rates[name] = flop / best / 1e9
    return rates


def cpu_load() -> str:
    """The 1, 5 and 15-minute load averages, e.g. ``"0.53 0.77 1.69"`` (other jobs' share)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
