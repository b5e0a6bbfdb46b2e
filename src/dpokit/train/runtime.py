"""Where a run executes: its ranks and device, seeds, precision, and the few collective operations the
loop needs. Single process by default; under `torchrun` one process per device (DDP or FSDP2)."""

import contextlib
import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dpokit.errors import UserError
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


def setup_distributed(parallelism: str = "ddp") -> Ranks:
    """Single process by default; under `torchrun` (WORLD_SIZE > 1) one process per device, DDP or FSDP2
    (train/parallel.py). fsdp needs torchrun's environment even for one process: its device mesh is
    built on a process group."""
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if parallelism == "fsdp" and not launched:
        raise UserError(
            "parallelism=fsdp needs torchrun (e.g. torchrun --nproc_per_node 8 -m dpokit.cli dpo ... "
            "parallelism=fsdp); a plain process trains alone without it"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or parallelism == "fsdp") and not dist.is_initialized():
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


def finish_distributed() -> None:
    """At the end of a successful command under torchrun: wait for every rank (rank 0 may still be writing
    the final model), then tear the process group down. A rank that leaves with the group alive while
    another still works can abort at exit ('terminate called without an active exception', seen with
    gloo), and torchrun then kills the others mid-save."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    # FSDP2's DTensor parameters: each rank checks its own shard, then the ranks agree
    sharded = any(isinstance(p, DTensor) for p in params)
    params = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    params = [p for p in params if p.numel()]
    finite = torch.isfinite(torch.stack(torch._foreach_norm(params, float("inf"))).max()) if params else True
    if sharded and dist.is_initialized():
        return all_reduce_sum(torch.tensor([0.0 if finite else 1.0])).item() == 0
    return bool(finite)
