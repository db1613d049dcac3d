"""The encoder interface shared by every kind."""

from __future__ import annotations

import math

import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.registry import ENCODERS


class Encoder(nn.Module):
    """One modality's media -> features [B, num_tokens, out_dim].

    `modality` names what it reads ("image" unless a kind says otherwise: the whisper and
    mel encoders read "audio"); a model's `encoders` keys it so, and its media fill that
    modality's placeholder. `load_media` turns one file into the encoder's input: image
    encoders take pixels in [0, 1] at `image_size` x `image_size` (`[B, 3, H, W]`) and
    normalise them themselves; audio encoders take log-mel features `[B, 80, F]`.
    `grid` is the (rows, cols) layout of the tokens when they form one, else None.
    """

    out_dim: int
    num_tokens: int
    image_size: int | None
    modality = "image"

    def load_media(self, path) -> torch.Tensor:
        """A file -> this encoder's input for one item (pixels [3, S, S] in [0, 1] for images)."""
        from polymodal.processing.images import load_image

        return load_image(path, self.image_size)

    @classmethod
    def sizes_from_data(cls, config: EncoderConfig) -> bool:
        """Whether `config` leaves sizes to the training data (a series encoder's `channels`
        or `length` at 0); training then calls `fit_to_data` before building the model."""
        return False

    @classmethod
    def fit_to_data(cls, config: EncoderConfig, media: list) -> EncoderConfig:
        """`config` with the sizes it leaves to the data filled from `media` (the stages'
        usable items of this modality); a kind with no such sizes returns it unchanged."""
        return config

    @property
    def grid(self) -> tuple[int, int] | None:
        side = math.isqrt(self.num_tokens)
        return (side, side) if side * side == self.num_tokens else None


class PixelNormalize(nn.Module):
    """(pixels - mean) / std per channel; pixels [B, 3, H, W] in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        # Constants of the architecture, not learned: kept out of the state dict.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)


def build_encoder(config: EncoderConfig, loader, key: str = "encoder") -> Encoder:
    """Build the registered encoder kind named by `config.kind`."""
    return ENCODERS.get(config.kind).builder(config, loader, key)
