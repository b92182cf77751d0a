"""Cache-sized pieces: how many images let a residual unit's tensors stay in the CPU's
last-level cache.

A large batch streams every unit's tensors through memory; where a network's convolutions do
little arithmetic per byte (ResNet-50's 1×1 convolutions), running the batch in pieces that fit
the cache is faster. :class:`~resunit.deploy.inference.OneDnnGraphModel` uses this.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.blocks import ResidualUnit

# A batch runs in cache-sized pieces only when its units' tensors would fill the cache this many
# times over: ResNet-50 gained 2-4% at batch 32 (8.4 times) and 5-7% at batch 16 (4.2), and lost
# 3% at batch 8 (2.1, in pieces of 4); ResNet-18 at batch 32 (2.3 times, in pieces of 11), whose
# 3×3 convolutions do more arithmetic per byte, lost 1.5% (ad-hoc checks, raw data not kept; run
# to run a rate moves ~1-2%).
SPLIT_FROM_CACHES = 4


def cache_sized_batch(model: nn.Module, image: Tensor) -> int | None:
    """How many images fit a residual unit's tensors in the CPU's last-level cache: the cache
    size over the bytes one image takes in the largest unit (:func:`unit_working_set`),
    rounded, as the unit's tensors are not all alive at once. None where that is not known (no
    residual units, no L3 reported, not on the CPU).

    ResNet-50's bottlenecks take up to 8.8 MB per image at 224×224, so a batch of 32 streams
    ~280 MB through memory in each unit, and its 1×1 convolutions do too little arithmetic per
    byte to hide that. On a 32 MB L3 (2 cores of an AMD EPYC) pieces of 4 ran at 57.6-58.3
    img/s against 55.0-56.6 for the whole batch, on a par with ONNX Runtime (56.6-58.2); pieces
    of 3 in between. See BENCHMARKS.md.
    """
    cache = last_level_cache_bytes()
    if cache is None or image.device.type != "cpu":
        return None
    per_image = unit_working_set(model, image)
    return max(1, round(cache / per_image)) if per_image else None


def unit_working_set(model: nn.Module, image: Tensor) -> int:
    """Bytes that one ``image`` needs at once in ``model``'s largest residual unit: the unit's
    input and the output of every convolution inside it (its layers and any projection), as
    they are all read or written within the unit. 0 for a model without residual units."""
    me = threading.get_ident()  # other threads' calls of the model are not counted
    tallies: dict[nn.Module, int] = {}

    def count_input(unit: nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == me:
            tallies[unit] = args[0].numel() * args[0].element_size()

    def count_output(unit: nn.Module) -> Callable[..., None]:
        def hook(_conv: nn.Module, _args: tuple[Any, ...], output: Tensor) -> None:
            if threading.get_ident() == me:
                tallies[unit] = tallies.get(unit, 0) + output.numel() * output.element_size()

        return hook

    handles = []
    try:
        for unit in model.modules():
            if isinstance(unit, ResidualUnit):
                handles.append(unit.register_forward_pre_hook(count_input))
                handles += [
                    conv.register_forward_hook(count_output(unit))
                    for conv in unit.modules()
                    if isinstance(conv, nn.Conv2d)
                ]
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return max(tallies.values(), default=0) // max(len(image), 1)


@functools.cache
def last_level_cache_bytes(
    cache_dir: str | os.PathLike[str] = "/sys/devices/system/cpu/cpu0/cache",
) -> int | None:
    """The size of CPU 0's level-3 cache as Linux reports it in ``cache_dir`` (shared by the
    cores that use it); None where it does not (other systems, no L3)."""
    for index in sorted(Path(cache_dir).glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            return int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except ValueError:  # empty or not a size: look no further than this entry
            continue
    return None


__all__ = ["SPLIT_FROM_CACHES", "cache_sized_batch", "last_level_cache_bytes", "unit_working_set"]
