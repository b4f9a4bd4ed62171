"""Data parallelism through torchrun: one process per device, gradients averaged by DDP.

Launch with `torchrun --nproc-per-node N -m memory_mosaics.cli train ...`. torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK; without them training runs in one process. The backend is nccl when the
processes use GPUs and gloo on CPU (gloo also lets a laptop test the multi-process path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from memory_mosaics.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, ctx: DistContext) -> torch.device:
    """`auto` is the process's own GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        if requested == "cuda":
            return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return torch.device(requested)


def setup(device_request: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = DistContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = pick_device(device_request, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over processes (float64 so sums of losses stay exact enough)."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(ctx: DistContext, obj):
    """Every process's `obj`, in rank order (used for small things such as generator states)."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_flag(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, shared with everyone (e.g. "stop now")."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
