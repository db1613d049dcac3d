"""`cabstractor`: Honeybee's C-Abstractor, convolutions that keep locality, pooled to K tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector, square_side
from polymodal.connectors.mlp import mlp_layers
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


@dataclass
class CAbstractorConnectorConfig(ConnectorConfig):
    kind: str = "cabstractor"
    num_tokens: int = 16  # K, a square number: the grid is pooled to sqrt(K) x sqrt(K)
    depth: int = 2  # residual conv blocks before and after pooling
    width: int | None = None  # channels of the conv blocks; defaults to the encoder's


class ResidualConvBlock(nn.Module):
    """x + Norm(Conv3x3(SiLU(Norm(Conv3x3(x))))), channels kept: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, channels)  # a LayerNorm over (C, H, W), batch-size free
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.norm1(self.conv1(x)))
        return F.silu(x + self.norm2(self.conv2(hidden)))


@register_connector("cabstractor", config=CAbstractorConnectorConfig)
class CAbstractor(Connector):
    """Conv blocks, adaptive average pooling to K tokens, conv blocks, MLP (Cha et al. 2024)."""

    def __init__(self, config: CAbstractorConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        self.side = square_side(in_tokens, "cabstractor", key)
        pooled = math.isqrt(config.num_tokens)
        if pooled * pooled != config.num_tokens or pooled > self.side:
            raise ConfigError(f"{key}.num_tokens: {config.num_tokens} must be a square "
                              f"number at most the encoder's {in_tokens} tokens")
        width = config.width or in_dim
        self.num_tokens = config.num_tokens
        self.input = nn.Conv2d(in_dim, width, 1) if width != in_dim else nn.Identity()
        self.before = nn.Sequential(*(ResidualConvBlock(width) for _ in range(config.depth)))
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.after = nn.Sequential(*(ResidualConvBlock(width) for _ in range(config.depth)))
        self.output = mlp_layers(width, out_dim, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, K, out_dim]."""
        batch, _, dim = features.shape
        grid = features.transpose(1, 2).reshape(batch, dim, self.side, self.side)  # [B, D, h, w]
        grid = self.after(self.pool(self.before(self.input(grid))))  # [B, W, sqrt K, sqrt K]
        return self.output(grid.flatten(2).transpose(1, 2))
