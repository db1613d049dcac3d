"""Media by modality: encoders and connectors keyed by modality, each with its placeholder;
a sample holding an image and an audio clip; the spelling and saved models from before."""

import json
import os
import wave

import numpy as np
import pytest
import torch

from conftest import DATA, image, tiny_config
from polymodal.config import ModelConfig, from_dict, to_dict
from polymodal.errors import ConfigError, UserError

IMAGE_AUDIO = {"llm": {"source": "tiny:llama"},
               "encoders": {"image": {"kind": "cnn", "image_size": 16, "channels": [8, 16], "pool": 2},
                            "audio": {"kind": "mel", "seconds": 0.5, "width": 16}},
               "connectors": {"image": {"kind": "mlp"}, "audio": {"kind": "stack", "factor": 5}}}


def write_tone(path, hertz: float, seconds: float = 0.5, rate: int = 16000):
    samples = (0.3 * np.sin(2 * np.pi * hertz * np.arange(int(rate * seconds)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return str(path)


def image_audio_model():
    from polymodal.model import MultimodalLM

    torch.manual_seed(0)
    return MultimodalLM(from_dict(ModelConfig, IMAGE_AUDIO, "model"))


def test_the_old_spelling_is_the_image_modality():
    config = tiny_config({"kind": "vit"}, {"kind": "mlp"})
    assert list(config.encoders) == ["image"] and config.encoders["image"].kind == "vit"
    assert config.connectors["image"].kind == "mlp" and config.encoder is None
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(config))))  # saved and read back
    assert again.encoders == config.encoders and again.connectors == config.connectors


@pytest.mark.parametrize("data, message", [
    ({"encoders": {"audio": {"kind": "cnn"}}, "connectors": {"audio": {"kind": "mlp"}}},
     "encoders.audio: a cnn encoder reads image, not audio"),
    ({"encoders": {"audio": {"kind": "mel"}}}, "connectors.audio: required"),
    ({"encoder": {"kind": "cnn"}, "connector": {"kind": "mlp"}, "encoders": {"image": {"kind": "vit"}},
      "connectors": {}}, "encoder: the image's encoder is given twice"),
])
def test_modality_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, **data}, "model")


def test_each_modality_has_its_placeholder_and_token_count(tmp_path):
    model = image_audio_model()
    clip = write_tone(tmp_path / "a.wav", 440)
    audio_id, image_id = model.placeholder_ids["audio"], model.placeholder_ids["image"]
    assert model.llm.tokenizer.convert_tokens_to_ids("<audio>") == audio_id != image_id
    parts = [{"type": "image", "image": image(0, 16)}, {"type": "text", "text": "and"},
             {"type": "audio", "audio": clip}, {"type": "text", "text": "what?"}]
    encoded = model.processor.encode([{"role": "user", "content": parts}])
    ids = encoded["input_ids"]
    assert ids.count(image_id) == model.connectors["image"].num_tokens == 4
    assert ids.count(audio_id) == model.connectors["audio"].num_tokens == 5  # 25 states, 5 a token
    assert ids.index(image_id) < ids.index(audio_id)  # in reading order
    assert encoded["media"]["audio"].shape == (1, 80, 50) and encoded["media"]["image"].shape == (1, 3, 16, 16)
    inline = model.processor.encode([{"role": "user", "content": "what?"}], [image(0, 16)], media={"audio": [clip]})
    assert inline["input_ids"].count(audio_id) == 5  # placed before the text, as images are
    with pytest.raises(UserError, match=r"0 audio item\(s\) given but 1 <audio> placeholder"):
        model.processor.encode([{"role": "user", "content": "<audio> what?"}])
    with pytest.raises(UserError, match=r"1 audio item\(s\) given but 2 <audio> placeholder"):
        model.processor.encode([{"role": "user", "content": "<audio><audio> what?"}], media={"audio": [clip]})
    with pytest.raises(UserError, match="unknown message part type 'video'"):
        model.processor.encode([{"role": "user", "content": [{"type": "video", "video": clip}]}])


def test_an_image_only_model_refuses_audio(tmp_path, tiny_llava):
    with pytest.raises(UserError, match="no audio encoder; it takes image"):
        tiny_llava.processor.encode([{"role": "user", "content": "hi"}], media={"audio": [tmp_path / "a.wav"]})


def test_a_sample_with_an_image_and_a_clip_trains(tmp_path):
    from polymodal.processing import collate

    model = image_audio_model()
    clips = [write_tone(tmp_path / f"{hertz}.wav", hertz) for hertz in (300, 900)]
    rows = [model.processor.encode_for_training(
        [{"role": "user", "content": "<image>\n<audio>\nWhich?"}, {"role": "assistant", "content": answer}],
        [image(seed, 16)], media={"audio": [clip]}) for seed, clip, answer in zip((0, 1), clips, ("low", "high"))]
    model.set_trainable(["connector.audio", "encoder.audio"])
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("connectors.audio.", "encoders.audio.")) for name in trained)
    model.set_trainable(["connector", "encoder.audio", "llm"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        batch = collate(rows, model.pad_id)
        embeds = model.embed(batch["input_ids"], {"image": torch.cat([r["media"]["image"] for r in rows]),
                                                  "audio": torch.cat([r["media"]["audio"] for r in rows])})
        logits = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
    assert model.encoders["audio"].conv1.weight.grad.abs().sum() > 0  # the clip is heard


def test_a_saved_model_of_format_1_still_loads():
    """tests/data/model-format-1: a tiny CLIP + MLP model saved by polymodal before
    modalities (format 1: parts `encoder`, `connector`); expected.json holds its last
    logits for one prompt, computed by that code."""
    from polymodal.build import load_any
    from polymodal.processing import collate

    folder = os.path.join(DATA, "model-format-1")
    model = load_any(folder)
    assert list(model.encoders) == ["image"] and model.config.encoder is None
    with open(os.path.join(folder, "expected.json")) as handle:
        expected = json.load(handle)
    encoded = model.processor.encode([{"role": "user", "content": "<image>What shape?"}], [image(0)])
    batch = collate([encoded], model.pad_id)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], encoded["media"])
        logits = model.llm.model(inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(logits[:5], torch.tensor(expected["last_logits_first5"]), atol=1e-5, rtol=1e-5)
    assert int(logits.argmax()) == expected["argmax"]


def test_old_checkpoint_names_load_as_the_image_modality(tiny_llava):
    state = {name.replace("connectors.image.", "connector.", 1): tensor + 1
             for name, tensor in tiny_llava.state_dict().items() if name.startswith("connectors.image.")}
    _, unexpected = tiny_llava.load_state_dict(state, strict=False)
    assert not unexpected
    for name, tensor in tiny_llava.connectors["image"].state_dict().items():
        torch.testing.assert_close(tensor, state[f"connector.{name}"])
