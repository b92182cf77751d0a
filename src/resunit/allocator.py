"""The process's memory allocator: keep freed memory for reuse (one process-wide switch)."""

from __future__ import annotations

import ctypes
import ctypes.util


def retain_freed_memory() -> bool:
    """Make this process keep freed memory for reuse instead of returning it to the system.

    glibc's ``malloc`` serves every block over 32 MiB with a fresh ``mmap`` and unmaps it on
    ``free``. A ResNet-50 at batch 32 has activations of ~100 MB, so each forward pass maps
    them again and the kernel zero-fills every page on first touch: we counted ~113,000 page
    faults per forward. With ``mmap`` off and the trim threshold raised, the heap keeps its
    peak size and later passes reuse it: zero faults, and ResNet-50 batch 32 ran 1.1× faster
    compiled and 1.5× faster folded+channels_last on 2 cores. Training frees and re-allocates
    its activations every step as well: resnet20 at batch 128 took up to ~12,000 faults per
    step without it, none with it; the speed-up there was within noise (0.99-1.17×,
    benchmarks/train_throughput.py) because glibc's own thresholds settle at that size.
    jemalloc or tcmalloc through ``LD_PRELOAD``, as Intel's tuning guides
    suggest, do the same from outside the process.

    Process-wide and irreversible, so the library never does it implicitly: the commands that
    own their process (``resunit train``, ``resunit bench``), servers and benchmarks call it
    once at start-up. The cost is that the process keeps its peak memory.
    Returns False where the C library is not glibc (nothing is changed then).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's <malloc.h>
    # mallopt returns 1 on success. The trim threshold is an int: 1 GiB is the most it takes.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**30))


__all__ = [
    "retain_freed_memory",
]
