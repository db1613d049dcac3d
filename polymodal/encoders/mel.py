"""`mel`: Whisper's convolutional front end alone, trained from scratch over log-mel features.

A small audio encoder for tests and for sounds no pretrained tower knows: two 1-D
convolutions (the second of stride 2), as the stem of Whisper (Radford et al. 2022,
`whisper/model.py` AudioEncoder), without its transformer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder
from polymodal.processing.audio import MEL_FRAMES_PER_SECOND, log_mel
from polymodal.registry import register_encoder


@dataclass
class MelEncoderConfig(EncoderConfig):
    kind: str = "mel"
    seconds: float = 3.0  # how much of each clip is heard
    width: int = 64  # channels of both convolutions


@register_encoder("mel", config=MelEncoderConfig)
class MelEncoder(Encoder):
    """Log-mel [B, 80, F] -> Conv1d(k3) GELU Conv1d(k3, stride 2) GELU -> [B, F / 2, width]."""

    modality = "audio"

    def __init__(self, config: MelEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        self.seconds, self.image_size = config.seconds, None
        self.conv1 = nn.Conv1d(80, config.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.width, config.width, kernel_size=3, stride=2, padding=1)
        frames = int(config.seconds * MEL_FRAMES_PER_SECOND)
        self.num_tokens, self.out_dim = (frames + 1) // 2, config.width

    def load_media(self, path) -> torch.Tensor:
        """A WAV file -> log-mel features [80, seconds * 100]."""
        return log_mel(path, self.seconds)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """[B, 80, F] log-mel -> [B, ceil(F / 2), width]."""
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(mels))))
        return hidden.transpose(1, 2)
