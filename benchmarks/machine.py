"""What this machine can do at most: theoretical float32 peak and a measured large GEMM.

The peak is cores × clock × FLOP per cycle, where FLOP per cycle comes from the widest vector
unit the CPU reports: AVX-512 = 16 float32 lanes, AVX2 = 8; two FMA units per core (Intel
Xeon Scalable since Skylake-SP Gold/Platinum, and every Sapphire Rapids part); an FMA is 2
FLOP. A virtual machine does not expose the FMA-unit count, so that part is an assumption and
is printed with the result.
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

FMA_UNITS_PER_CORE = 2


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
    return Machine(model, cores, threads, clock, source, vector_bits, flags, FMA_UNITS_PER_CORE)


def measure_gemm_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a ``size``³ matrix product (MKL): what the cores really deliver."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_load() -> str:
    """The 1, 5 and 15-minute load averages, e.g. ``"0.53 0.77 1.69"`` (other jobs' share)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
