"""Contrastive losses under DDP: every process scores its rows against the whole global batch.

Each process all-gathers the embeddings of every process with the autograd-aware
`torch.distributed.nn.functional.all_gather`, then computes the same loss over the
global batch. Its backward sums, into each process's own rows, the gradients of every
process's (identical) loss: N times the gradient of the global loss. DDP then averages
parameter gradients over the N processes, which divides that N out again, so the
update equals one process training on the whole global batch (tested).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """[B_local, ...] on each process -> [B_global, ...] in rank order (itself when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor))
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)
