"""Multi-process training with `torchrun --nproc_per_node N polymodal ...` (DDP or FSDP).

The same recipe runs on one process or many: every process draws the same global
batch and keeps its own slice of it (rows rank, rank + N, ...), and only rank 0 writes
files. `parallel: ddp` (the default) keeps a whole model on each process and averages
the gradients; `parallel: fsdp` shards a copy of the model over the processes (FSDP2's
`fully_shard`: each decoder/encoder block, then the rest), gathers the parameters it
needs layer by layer, and reduce-scatters the gradients. The model itself stays whole
for building batches, caching features and saving: the sharded copy's weights are
gathered back into it at every checkpoint and at the stage's end.

Each process trains on its own device: GPU `LOCAL_RANK` when CUDA is there (NCCL between
processes), else the CPU (gloo). Only the CPU path is exercised here (this machine has no GPU).
"""

from __future__ import annotations

import os
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


def default_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else CPU


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, value: float) -> float:
        """The mean of a number over all processes (itself when alone)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(tensor)
        return float(tensor) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE_PROCESS = World()


def setup() -> World:
    """Join the process group that torchrun describes in the environment, if any; each
    process takes its own GPU (LOCAL_RANK) when there are GPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def wrap(model: torch.nn.Module, world: World, strategy: str = "ddp") -> torch.nn.Module:
    """The module a stage's steps run (after freezing, which DDP and FSDP read once): the
    model itself when alone, DDP around it, or a sharded copy of it for FSDP."""
    if world.size == 1:
        return model
    if strategy == "fsdp":
        return sharded_copy(model)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with every block of every ModuleList (transformer layers,
    encoder stages) sharded as its own FSDP unit, then the rest as the root unit."""
    from torch.distributed.fsdp import fully_shard

    copy = deepcopy(model)
    blocks = [block for module in copy.modules() if isinstance(module, torch.nn.ModuleList)
              for block in module if any(True for _ in block.parameters())]
    for block in reversed(blocks):  # inner blocks before the blocks that hold them
        fully_shard(block)
    fully_shard(copy)
    return copy


def is_sharded(trainer: torch.nn.Module) -> bool:
    """Whether `trainer` is an FSDP-sharded copy (`sharded_copy`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(trainer, FSDPModule)


def unwrapped(trainer: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters the optimizer steps: DDP's inner module, or the
    trainer itself (the model alone, or its sharded copy)."""
    from torch.nn.parallel import DistributedDataParallel

    return trainer.module if isinstance(trainer, DistributedDataParallel) else trainer


def gather_into(model: torch.nn.Module, trainer: torch.nn.Module) -> None:
    """Copy a sharded copy's full weights back into the model (on every process)."""
    if trainer is model or not is_sharded(trainer):  # alone, or DDP: the same tensors
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict(full)


def full_optimizer_state(trainer: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state as one process's `optimizer.state_dict()` would hold it
    (integer ids in parameter order), gathered from the shards for FSDP."""
    if not is_sharded(trainer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(trainer, optimizer, options=StateDictOptions(full_state_dict=True))
    order = _parameter_names(trainer, optimizer)
    index = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]]
    return {"state": {index[name]: slots for name, slots in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(trainer: torch.nn.Module, optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`."""
    if not is_sharded(trainer):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _parameter_names(trainer, optimizer)
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    named = {"state": {order[i]: slots for i, slots in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(trainer, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _parameter_names(trainer: torch.nn.Module, optimizer) -> list[str]:
    name_of = {id(p): name for name, p in trainer.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
