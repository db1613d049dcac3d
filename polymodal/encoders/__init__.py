"""Modality encoders: media -> features [B, S, D]. Importing this package registers every kind."""

from polymodal.encoders import cnn, cnn1d, hf, mel, multi, patches, patchtst, vit, whisper  # noqa: F401
from polymodal.encoders.base import Encoder, build_encoder

__all__ = ["Encoder", "build_encoder"]
