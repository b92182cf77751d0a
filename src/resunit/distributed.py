"""One training in several processes under ``torchrun`` (DistributedDataParallel): where
this process stands, its share of each epoch's data, and the decisions every rank must take
together at the same step (stop on a diverged loss or on Ctrl-C), or the others would wait
forever in the next all-reduce.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Distributed:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU,
    NCCL on CUDA); a plain single process needs nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shard_indices(n: int, generator: torch.Generator, rank: int, world_size: int) -> Tensor:
    """This rank's part of a fresh permutation of ``range(n)``: disjoint across ranks, all of
    equal length (the remainder is dropped so every rank takes the same number of steps)."""
    perm = torch.randperm(n, generator=generator)
    usable = n - n % world_size
    return perm[:usable][rank::world_size]


def broadcast_buffers(model: nn.Module) -> None:
    # DDP syncs buffers at the start of each forward, so after the last step of an epoch the
    # BN running statistics differ by rank; rank 0's become everyone's before eval and save.
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def agree_on_step(
    loss: float, interrupted: bool, dist_info: Distributed, device: torch.device
) -> tuple[bool, bool]:
    """Whether ``loss`` is finite on every rank, and whether any rank saw Ctrl-C
    (``interrupted`` is this rank's answer).

    All ranks must stop at the same step, or those still training wait forever in DDP's next
    all-reduce. Both questions travel in one collective per step (not one each): across
    machines a collective's latency is paid every step. The flags live on the training device,
    as NCCL requires (see :func:`stop_requested`).
    """
    if not dist_info.enabled:
        return math.isfinite(loss), interrupted
    flags = torch.tensor([float(not math.isfinite(loss)), float(interrupted)], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)  # any rank's
    diverged, stop = flags.tolist()
    return not diverged, bool(stop)


def stop_requested(interrupted: bool, dist_info: Distributed, device: torch.device) -> bool:
    """Whether any rank saw Ctrl-C (all ranks must stop at the same epoch's end)."""
    if not dist_info.enabled:
        return interrupted
    # On the training device: NCCL, the backend on CUDA, reduces only CUDA tensors (a CPU one
    # fails), while gloo takes the CPU ones.
    flag = torch.tensor([float(interrupted)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # any rank's
    return bool(flag.item())


__all__ = [
    "Distributed",
    "agree_on_step",
    "broadcast_buffers",
    "setup_distributed",
    "shard_indices",
    "stop_requested",
]
