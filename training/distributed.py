"""Data-parallel training with torch.distributed: torchrun launches, gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap(model: torch.nn.Module, world: World, device: str) -> torch.nn.Module:
    if world.size == 1:
        return model
    ids = [world.local_rank] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def scaled_lr(lr: float, scaling: str, world: World) -> float:
    """The DeepFM paper's multi-GPU setting scales the learning rate by sqrt(#workers)."""
    factor = {"none": 1.0, "sqrt": world.size**0.5, "linear": float(world.size)}
    if scaling not in factor:
        raise ValueError(f"lr scaling must be one of {sorted(factor)}, not {scaling!r}")
    return lr * factor[scaling]


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
