"""Pre-norm attention and feed-forward sublayers shared by the resampling connectors."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """x + MultiheadAttention(LN(x), LN(context)): queries x [B, Q, D], keys/values context [B, S, D]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(x), context, context, need_weights=False)
        return x + attended


class FeedForward(nn.Module):
    """x + MLP(LN(x)) with a GELU hidden layer `mult` times wider."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def check_heads(width: int, heads: int, key: str) -> None:
    from polymodal.errors import ConfigError

    if heads < 1 or width % heads:
        raise ConfigError(f"{key}.heads: {heads} does not divide width {width}")
