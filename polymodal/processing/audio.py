"""Audio files -> Whisper's log-mel features; a bad file is a UserError naming it."""

from __future__ import annotations

import io
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from polymodal.errors import UserError

AUDIO_SUFFIXES = {".wav"}
SAMPLE_RATE = 16000  # what Whisper hears
MEL_FRAMES_PER_SECOND = 100  # 10 ms hop


def read_wav(path: str | Path | bytes) -> np.ndarray:
    """A 16-bit PCM WAV file (or its bytes, as a request carries it) -> mono float32 samples
    in [-1, 1] at 16 kHz (linear resampling). UserError naming the file when it is not one."""
    if isinstance(path, bytes):
        source, path = io.BytesIO(path), "the audio sent"
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"audio file not found: {path}")
        source = str(path)
    try:
        with wave.open(source) as handle:
            if handle.getsampwidth() != 2:
                raise UserError(f"unsupported audio (not 16-bit PCM): {path}")
            rate, channels = handle.getframerate(), handle.getnchannels()
            raw = handle.readframes(handle.getnframes())
        samples = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
        samples = samples.reshape(-1, channels).mean(axis=1)
    except (wave.Error, EOFError, OSError, ValueError):  # ValueError: frames cut mid-sample
        raise UserError(f"not a WAV file: {path}") from None
    if rate != SAMPLE_RATE and len(samples):
        times = np.arange(0, len(samples) / rate, 1 / SAMPLE_RATE)
        samples = np.interp(times, np.arange(len(samples)) / rate, samples).astype(np.float32)
    return samples


@lru_cache(maxsize=1)
def _feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()  # 80 mel bins, 16 kHz, 25 ms windows, 10 ms hop


def log_mel(path: str | Path | bytes, seconds: float) -> torch.Tensor:
    """The first `seconds` of a WAV file (a path or its bytes) as Whisper's log-mel features [80, seconds * 100]
    (silence-padded; normalised the way Whisper's own feature extractor does)."""
    features = _feature_extractor()(read_wav(path), sampling_rate=SAMPLE_RATE, return_tensors="np")
    frames = int(seconds * MEL_FRAMES_PER_SECOND)
    return torch.from_numpy(features.input_features[0, :, :frames].copy())
