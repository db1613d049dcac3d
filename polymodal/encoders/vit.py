"""`vit`: a small vision transformer trained from scratch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, PixelNormalize
from polymodal.encoders.patches import patch_count, patchify
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class VitEncoderConfig(EncoderConfig):
    kind: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0


@register_encoder("vit", config=VitEncoderConfig)
class VitEncoder(Encoder):
    """A ViT from scratch: patch embedding, learned positions, pre-norm transformer blocks."""

    def __init__(self, config: VitEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        self.num_tokens = patch_count(config.image_size, config.patch_size, key)
        if config.width % config.heads:
            raise ConfigError(f"{key}.heads: {config.heads} does not divide width {config.width}")
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.out_dim = config.width
        self.normalize = PixelNormalize((0.5,) * 3, (0.5,) * 3)
        self.patch_embed = nn.Linear(3 * config.patch_size**2, config.width)
        self.position = nn.Parameter(torch.randn(1, self.num_tokens, config.width) * 0.02)
        block = nn.TransformerEncoderLayer(
            config.width, config.heads, int(config.width * config.mlp_ratio),
            dropout=0.0, activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, (H/p)*(W/p), width]."""
        tokens = self.patch_embed(patchify(self.normalize(pixels), self.patch_size))
        return self.norm(self.blocks(tokens + self.position))
