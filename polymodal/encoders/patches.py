"""`patches`: Fuyu-style early fusion; image patches go to the LLM with no encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, PixelNormalize
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order."""
    batch, channels, height, width = pixels.shape
    grid = pixels.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * patch * patch)


def patch_count(image_size: int, patch_size: int, key: str) -> int:
    """Patches in a square image, or a config error when the patch size does not divide it."""
    if patch_size < 1 or image_size % patch_size:
        raise ConfigError(f"{key}.patch_size: {patch_size} does not divide image_size {image_size}")
    return (image_size // patch_size) ** 2


@dataclass
class PatchesEncoderConfig(EncoderConfig):
    kind: str = "patches"
    image_size: int = 64
    patch_size: int = 8
    width: int | None = None  # a linear patch embedding to this width; None keeps raw pixels


@register_encoder("patches", config=PatchesEncoderConfig)
class PatchEncoder(Encoder):
    """Patchify (+ an optional linear embedding); the connector carries patches to the LLM."""

    def __init__(self, config: PatchesEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        self.num_tokens = patch_count(config.image_size, config.patch_size, key)
        self.image_size, self.patch_size = config.image_size, config.patch_size
        raw_dim = 3 * config.patch_size**2
        self.normalize = PixelNormalize((0.5,) * 3, (0.5,) * 3)
        self.embed = nn.Linear(raw_dim, config.width) if config.width else nn.Identity()
        self.out_dim = config.width or raw_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, (H/p)*(W/p), width or 3*p*p]."""
        return self.embed(patchify(self.normalize(pixels), self.patch_size))
