"""`hf`: a pretrained vision transformer through transformers (CLIP, SigLIP, DINOv2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, PixelNormalize
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class HFEncoderConfig(EncoderConfig):
    kind: str = "hf"
    source: str = "tiny:clip"
    layer: int = -2  # which hidden state; LLaVA reads the penultimate layer
    keep_cls: bool = False  # keep the CLS token (CLIP, DINOv2 have one; SigLIP has none)


@register_encoder("hf", config=HFEncoderConfig)
class HFVisionEncoder(Encoder):
    """CLIP, SigLIP or DINOv2 vision tower; features of one hidden layer."""

    def __init__(self, config: HFEncoderConfig, loader, key: str):
        super().__init__()
        self.model, (self.image_size, mean, std) = loader.vision_model(key, config.source)
        self.normalize = PixelNormalize(mean, std)
        vision = self.model.config
        depth = vision.num_hidden_layers
        if not -(depth + 1) <= config.layer <= depth:
            raise ConfigError(f"{key}.layer: {config.layer} is out of range for {depth} layers")
        self.layer = config.layer
        patches = (self.image_size // vision.patch_size) ** 2
        # CLIP and DINOv2 prepend a CLS token; SigLIP pools without one.
        self.has_cls = vision.model_type.split("_")[0] != "siglip"
        if config.keep_cls and not self.has_cls:
            raise ConfigError(f"{key}.keep_cls: {vision.model_type} has no CLS token")
        self.keep_cls = config.keep_cls
        self.num_tokens = patches + int(self.keep_cls)
        self.out_dim = vision.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, S, D] (S patches, plus CLS when kept)."""
        output = self.model(pixel_values=self.normalize(pixels), output_hidden_states=True)
        features = output.hidden_states[self.layer]
        if self.has_cls and not self.keep_cls:
            features = features[:, 1:]
        return features
