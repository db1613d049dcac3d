"""`image-tokens`: an image read as its tokenizer's discrete codes, each code embedded
(Chameleon's early fusion, Chameleon Team 2024: the LLM reads an image as a sequence of
codebook tokens rather than as a vision tower's continuous features).

The image goes through an `ImageTokenizer` (encoders/image_tokenizer.py) to K codes, and an
`nn.Embedding(codebook_size, dim)` turns each into a `dim`-wide feature; a connector
(linear or mlp) maps them to LLM tokens. The codes are integers, so no gradient reaches
the tokenizer from the LLM's loss: `objective: autoencoder` trains it (part
`encoder.image`), and later stages train the embedding with the connector, or leave it.

The tokenizer's options are given inline (`image_size`, `downsample`, `levels`,
`channels`) or as `tokenizer: {...}`, not both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from polymodal.config import EncoderConfig, ImageTokenizerConfig
from polymodal.encoders.base import Encoder
from polymodal.encoders.image_tokenizer import ImageTokenizer
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder

INLINE = ("image_size", "downsample", "levels", "channels")  # the tokenizer's fields an encoder config may hold


@dataclass
class ImageTokensEncoderConfig(EncoderConfig):
    kind: str = "image-tokens"
    dim: int = 128  # the width of each code's embedding (the connector's input)
    tokenizer: ImageTokenizerConfig | None = None  # or its fields inline, below
    image_size: int = 64
    downsample: int = 8  # 64 / 8: an 8x8 grid, 64 codes (tokens) per image
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ levels: 1000 codes
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])  # conv widths, one per halving

    def __post_init__(self):
        defaults = ImageTokensEncoderConfig.__dataclass_fields__
        inline = [name for name in INLINE if getattr(self, name) != _default(defaults[name])]
        if self.tokenizer is not None and inline:
            raise ConfigError(f"{inline[0]}: give the tokenizer's options inline or in tokenizer: {{...}}, not both")
        if self.tokenizer is None:
            self.tokenizer_config()  # checks the inline options now
        elif self.tokenizer.kind != "fsq":
            raise ConfigError("tokenizer.kind: image-tokens reads discrete codes (kind fsq)")
        if self.dim < 1:
            raise ConfigError(f"dim: must be at least 1, got {self.dim}")

    def tokenizer_config(self) -> ImageTokenizerConfig:
        """The tokenizer's config: `tokenizer`, or one made of the inline fields."""
        if self.tokenizer is not None:
            return self.tokenizer
        return ImageTokenizerConfig(kind="fsq", **{name: getattr(self, name) for name in INLINE})


def _default(spec: dataclasses.Field):
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


@register_encoder("image-tokens", config=ImageTokensEncoderConfig)
class ImageTokensEncoder(Encoder):
    """An FSQ image tokenizer's codes, embedded: [N, 3, S, S] -> [N, K, dim] (Chameleon)."""

    def __init__(self, config: ImageTokensEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        self.tokenizer = ImageTokenizer(config.tokenizer_config())
        self.embedding = nn.Embedding(self.tokenizer.codebook_size, config.dim)
        self.image_size = self.tokenizer.image_size
        self.num_tokens = self.tokenizer.num_codes
        self.out_dim = config.dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, S, S] in [0, 1] -> code embeddings [N, K, dim], raster order."""
        with torch.no_grad():  # integer codes: nothing to differentiate through
            codes = self.tokenizer.encode(pixels)  # [N, K]
        return self.embedding(codes)


def image_tokenizer_of(model: nn.Module, parts: list[str] | None = None) -> tuple[str, ImageTokenizer] | None:
    """(part name, tokenizer) of a model's image tokenizer: `model.image_tokenizer` (a model
    that draws images), else the tokenizer inside an `image-tokens` image encoder (part
    `encoder.image`); None when it has neither. `parts`: only a tokenizer these trainable
    parts hold (`encoder` holds every encoder)."""
    found = []
    own = getattr(model, "image_tokenizer", None)
    if isinstance(own, ImageTokenizer):
        found.append(("image_tokenizer", own))
    encoders = getattr(model, "encoders", None)
    if encoders is not None and "image" in encoders and isinstance(encoders["image"], ImageTokensEncoder):
        found.append(("encoder.image", encoders["image"].tokenizer))
    if parts is not None:
        found = [(part, tokenizer) for part, tokenizer in found
                 if part in parts or (part == "encoder.image" and "encoder" in parts)]
    return found[0] if found else None
