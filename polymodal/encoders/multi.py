"""`multi`: several encoders' features concatenated along channels (e.g. CLIP + DINOv2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, build_encoder
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class MultiEncoderConfig(EncoderConfig):
    kind: str = "multi"
    parts: list[EncoderConfig] = field(default_factory=list)


@register_encoder("multi", config=MultiEncoderConfig)
class MultiEncoder(Encoder):
    """Runs each part on the same image and concatenates features: [B, S, D1 + D2 + ...]."""

    def __init__(self, config: MultiEncoderConfig, loader, key: str = "encoder"):
        super().__init__()
        if len(config.parts) < 2:
            raise ConfigError(f"{key}.parts: multi needs at least two encoders")
        self.parts = nn.ModuleList(
            build_encoder(part, loader, f"{key}.parts.{i}") for i, part in enumerate(config.parts)
        )
        counts = [part.num_tokens for part in self.parts]
        if len(set(counts)) != 1:
            raise ConfigError(f"{key}.parts: token counts differ ({counts}); choose layers, "
                              "image sizes and CLS settings that give every part the same count")
        self.num_tokens = counts[0]
        self.image_size = max(part.image_size for part in self.parts)
        self.out_dim = sum(part.out_dim for part in self.parts)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, S, sum of parts' D]; each part sees its own size."""
        features = []
        for part in self.parts:
            sized = pixels
            if part.image_size != pixels.shape[-1]:
                sized = F.interpolate(pixels, size=(part.image_size,) * 2, mode="bilinear",
                                      antialias=True, align_corners=False)
            features.append(part(sized))
        return torch.cat(features, dim=-1)
