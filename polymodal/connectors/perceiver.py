"""`perceiver`: Flamingo's Perceiver Resampler, a fixed number of learned latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector
from polymodal.connectors.layers import Attention, FeedForward, check_heads
from polymodal.registry import register_connector


@dataclass
class PerceiverConnectorConfig(ConnectorConfig):
    kind: str = "perceiver"
    num_latents: int = 64  # R: tokens per image, whatever the encoder gives
    depth: int = 2  # L
    heads: int = 4
    width: int | None = None  # working width; defaults to the encoder's


@register_connector("perceiver", config=PerceiverConnectorConfig)
class PerceiverResampler(Connector):
    """R latents attend to [features; latents] in each of L layers (Flamingo, Alayrac et al. 2022)."""

    def __init__(self, config: PerceiverConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        width = config.width or in_dim
        check_heads(width, config.heads, key)
        self.num_tokens = config.num_latents
        self.input = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(config.num_latents, width) * 0.02)
        self.attention = nn.ModuleList(Attention(width, config.heads) for _ in range(config.depth))
        self.feed_forward = nn.ModuleList(FeedForward(width) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, R, out_dim]."""
        media = self.input(features)  # [B, S, W]
        latents = self.latents.expand(media.shape[0], -1, -1)  # [B, R, W]
        for attention, feed_forward in zip(self.attention, self.feed_forward):
            # Flamingo's keys and values are the media and the latents together.
            latents = attention(latents, torch.cat([media, latents], dim=1))
            latents = feed_forward(latents)
        return self.output(self.norm(latents))
