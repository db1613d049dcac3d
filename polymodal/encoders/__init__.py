"""Modality encoders: media -> features [B, S, D]. Importing this package registers every kind."""

from polymodal.encoders import (  # noqa: F401
    cnn,
    cnn1d,
    hf,
    image_tokens,
    mel,
    multi,
    patches,
    patchtst,
    vit,
    whisper,
)
from polymodal.encoders.base import Encoder, build_encoder

__all__ = ["Encoder", "build_encoder"]
