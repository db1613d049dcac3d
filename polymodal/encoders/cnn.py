"""`cnn`: a small convolutional encoder trained from scratch; its feature map is the token grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, PixelNormalize
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class CNNEncoderConfig(EncoderConfig):
    kind: str = "cnn"
    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 192])  # one 3x3 conv each
    # Every stage but the last halves the resolution: 64 px and 4 stages give an 8x8 grid.
    pool: int | None = None  # max-pool the final grid to pool x pool tokens (1: one global token)


@register_encoder("cnn", config=CNNEncoderConfig)
class CNNEncoder(Encoder):
    """Conv 3x3 + ReLU stages with 2x2 max-pooling between them; tokens are the final grid cells."""

    def __init__(self, config: CNNEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        if not config.channels:
            raise ConfigError(f"{key}.channels: at least one stage")
        stride = 2 ** (len(config.channels) - 1)
        if config.image_size % stride:
            raise ConfigError(f"{key}.image_size: {config.image_size} does not divide by {stride} "
                              f"({len(config.channels)} stages halve it {len(config.channels) - 1} times)")
        self.image_size = config.image_size
        self.normalize = PixelNormalize((0.5,) * 3, (0.5,) * 3)
        layers: list[nn.Module] = []
        previous = 3
        for index, channels in enumerate(config.channels):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU()]
            previous = channels
        side = config.image_size // stride
        if config.pool is not None:
            if not 1 <= config.pool <= side:
                raise ConfigError(f"{key}.pool: must be between 1 and the {side}x{side} grid's side")
            # Max, not mean: a small shape lights up a few cells wherever it sits.
            layers.append(nn.AdaptiveMaxPool2d(config.pool))
            side = config.pool
        self.body = nn.Sequential(*layers)
        self.num_tokens = side**2
        self.out_dim = previous

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, side*side, C_last], cells in row-major order."""
        return self.body(self.normalize(pixels)).flatten(2).transpose(1, 2)
