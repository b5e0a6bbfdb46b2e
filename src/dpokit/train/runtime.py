"""Where a run executes: its ranks and device, seeds, precision, and the few collective operations the
loop needs. Single process by default; under `torchrun` one process per device (DDP or, later, FSDP)."""

import contextlib
import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dpokit.precision import resolve_for as resolve_precision


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0


def setup_distributed() -> Ranks:
    """Single process by default; under `torchrun` (WORLD_SIZE > 1) one process per device, DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # metrics are reduced as CPU tensors: gloo for those, nccl for the gradients on GPUs
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Ranks(rank, world, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast(device, precision: str):
    """bf16 autocast (fp32 master weights) or nothing; `auto` picks what the device runs natively."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_finite(params) -> bool:
    """Whether every value of every tensor is finite: one max-abs per tensor (no overflow, unlike a
    sum of squares; NaN propagates through max), one host sync."""
    params = [p.detach() for p in params]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, float("inf"))).max()))
