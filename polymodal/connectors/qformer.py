"""`qformer`: BLIP-2's Querying Transformer, learned queries reading the image features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector
from polymodal.connectors.layers import Attention, FeedForward, check_heads
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


@dataclass
class QFormerConnectorConfig(ConnectorConfig):
    kind: str = "qformer"
    num_queries: int = 32  # BLIP-2 uses 32
    depth: int = 2
    heads: int = 4
    width: int = 256
    cross_attention_every: int = 1  # BLIP-2 cross-attends in every other block (2)


class QFormerBlock(nn.Module):
    """Self-attention among queries, cross-attention to features (when enabled), feed-forward."""

    def __init__(self, width: int, heads: int, cross: bool):
        super().__init__()
        self.self_attention = Attention(width, heads)
        self.cross_attention = Attention(width, heads) if cross else None
        self.feed_forward = FeedForward(width)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = self.self_attention(queries, queries)
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, features)
        return self.feed_forward(queries)


@register_connector("qformer", config=QFormerConnectorConfig)
class QFormer(Connector):
    """Q learned queries -> Q tokens: self-attention and cross-attention blocks (Li et al. 2023)."""

    def __init__(self, config: QFormerConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        check_heads(config.width, config.heads, key)
        if config.cross_attention_every < 1:
            raise ConfigError(f"{key}.cross_attention_every: must be at least 1")
        self.num_tokens = config.num_queries
        self.input = nn.Linear(in_dim, config.width)
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            QFormerBlock(config.width, config.heads, cross=i % config.cross_attention_every == 0)
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.output = nn.Linear(config.width, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, Q, out_dim]."""
        features = self.input(features)  # [B, S, W]
        queries = self.queries.expand(features.shape[0], -1, -1)  # [B, Q, W]
        for block in self.blocks:
            queries = block(queries, features)
        return self.output(self.norm(queries))
