"""Multi-process training with `torchrun --nproc_per_node N polymodal ...` (DDP).

The same recipe runs on one process or many: every process draws the same global
batch and keeps its own slice of it (rows rank, rank + N, ...), DDP averages the
gradients, and only rank 0 writes files. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, value: float) -> float:
        """The mean of a number over all processes (itself when alone)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE_PROCESS = World()


def setup() -> World:
    """Join the process group that torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE_PROCESS
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """DDP around the model for one stage (after freezing, which DDP reads once)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
