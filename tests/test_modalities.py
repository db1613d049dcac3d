"""Media by modality: encoders and connectors keyed by modality, each with its placeholder;
a sample holding an image and an audio clip; the spelling and saved models from before."""

import base64
import io
import json
import os
import shutil
import wave

import numpy as np
import pytest
import torch

from conftest import DATA, image, tiny_config
from polymodal.config import ModelConfig, from_dict, to_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
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
    from polymodal.objectives.losses import next_token_loss
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
    batch = collate(rows, model.pad_id)
    assert batch.media["audio"].shape == (2, 80, 50) and batch.media["image"].shape == (2, 3, 16, 16)
    for _ in range(30):
        loss = next_token_loss(model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
    assert model.encoders["audio"].conv1.weight.grad.abs().sum() > 0  # the clip is heard


def test_a_sample_with_an_image_and_a_clip_generates(tmp_path):
    from polymodal.engine.generate import Engine

    model = image_audio_model().eval()
    clips = [write_tone(tmp_path / f"{hertz}.wav", hertz) for hertz in (300, 900)]
    prompts = [{"messages": [{"role": "user", "content": "Which?"}], "images": [image(seed, 16)],
                "media": {"audio": [clip]}} for seed, clip in enumerate(clips)]
    engine = Engine(model)
    completions = engine.generate(prompts)
    assert all(c.prompt_tokens == len(model.processor.encode(p["messages"], p["images"], media=p["media"])["input_ids"])
               for c, p in zip(completions, prompts))
    # the same answer alone as in a batch: the clips reach their own rows
    [alone] = engine.generate(prompts[1:])
    assert alone.token_ids == completions[1].token_ids
    assert not set(model.placeholder_ids.values()) & {t for c in completions for t in c.token_ids}


def test_rows_of_several_samples_never_share_a_clip(tmp_path):
    from polymodal.processing.branches import merge_branches

    model = image_audio_model()
    picture = image(0, 16)
    examples = []
    for name in ("a", "b"):
        encoded = model.processor.encode_for_training(
            [{"role": "user", "content": "<image>\n<audio>"}, {"role": "assistant", "content": name}],
            [picture], load_images=False, media={"audio": [None]})
        examples.append({"input_ids": encoded["input_ids"], "labels": encoded["labels"], "images": ["same.png"],
                         "media_paths": {"audio": [f"{name}.wav"]}})
    merged = merge_branches(examples, model.placeholder_ids["image"], 4, [model.placeholder_ids["audio"]])
    audio_id = model.placeholder_ids["audio"]
    assert merged["input_ids"].count(audio_id) == 2 * 5  # each branch keeps its own clip's tokens
    assert merged["media_paths"] == {"audio": ["a.wav", "b.wav"]} and merged["images"] == ["same.png"]
    first_audio = merged["input_ids"].index(audio_id)
    assert merged["branch_ids"][first_audio] == 1  # in a branch, not in the shared prefix


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
        embeds = model.embed(batch.input_ids, batch.media)
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


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_questions_test_voices_are_never_heard_in_training(tmp_path, monkeypatch):
    from polymodal.data.easy_vqa_spoken import (
        EasyVQASpokenOptions,
        read_easy_vqa_spoken,
        spoken_questions,
    )

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    folder = tmp_path / "split"
    (folder / "images").mkdir(parents=True)
    questions = [["what shape is in the image?", "circle", 0], ["is there a red shape?", "no", 0],
                 ["what color is the shape?", "blue", 0], ["what color is the shape?", "blue", 1]]
    (folder / "questions.json").write_text(json.dumps(questions))
    for index in (0, 1):
        (folder / "images" / f"{index}.png").write_bytes(b"")
    train = spoken_questions("train", folder)
    test = spoken_questions("test", folder)
    assert {s.voice for s in train}.isdisjoint({s.voice for s in test})
    assert len({s.voice for s in train}) == 4  # one question, the next voice
    samples = read_easy_vqa_spoken(EasyVQASpokenOptions(path=str(folder), split="train"))
    assert samples[0].messages == [{"role": "user", "content": "<image>\n<audio>"},
                                   {"role": "assistant", "content": "circle"}]
    assert samples[0].media["audio"] == [train[0].clip] and os.path.getsize(train[0].clip) > 1000
    items = EasyVQASpokenOptions.for_evaluation("test", str(folder)).question_items()
    assert items[2].references == ["blue"] and items[2].info["type"] == "colour"
    assert items[2].prompt()["media"] == {"audio": [test[2].clip]}
    [flipped] = spoken_questions("train", folder, flip_yes_no=True)  # asked about the colour it has
    assert (flipped.question, flipped.answer) == ("is there a blue shape?", "yes")
    transcripts = read_easy_vqa_spoken(EasyVQASpokenOptions(path=str(folder), transcribe=True))
    assert sorted(t.messages[1]["content"] for t in transcripts) == sorted(q for q, _, _ in questions)


def audio_part(path) -> dict:
    with open(path, "rb") as handle:
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(handle.read()).decode(), "format": "wav"}}


def test_the_server_takes_input_audio_parts(tmp_path):
    import httpx
    from test_serve import LiveServer, png_uri

    from polymodal.engine.batching import BatchingEngine
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    model = image_audio_model().eval()
    clip = write_tone(tmp_path / "a.wav", 500)
    engine = BatchingEngine(model, max_batch=2, max_queue=8).start()
    app = create_app(model, "tiny", engine, MediaLimits(max_audio=1))
    content = [{"type": "image_url", "image_url": {"url": png_uri(size=(16, 16))}}, audio_part(clip),
               {"type": "text", "text": "Which?"}]
    try:
        with LiveServer(app) as server:
            def ask(parts):
                return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                    "model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 5,
                    "temperature": 0})

            answer = ask(content)
            assert answer.status_code == 200, answer.text
            from PIL import Image

            picture = Image.open(io.BytesIO(base64.b64decode(png_uri(size=(16, 16)).split(",", 1)[1]))).convert("RGB")
            alone = Engine(model).generate([{"messages": [{"role": "user", "content": "Which?"}], "images": [picture],
                                             "media": {"audio": [clip]}}], SamplingParams(max_new_tokens=5))[0]
            assert answer.json()["choices"][0]["message"]["content"] == alone.text
            mp3 = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}
            refusals = [(mp3, 415, "unsupported audio format 'mp3'"),
                        ({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, 400, "invalid base64"),
                        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, 400, "not a WAV file"),
                        ({"type": "input_audio"}, 400, "needs \"input_audio\"")]
            for part, status, message in refusals:
                refused = ask([part, {"type": "text", "text": "hi"}])
                assert refused.status_code == status and message in refused.json()["error"]["message"], refused.text
                assert refused.json()["error"]["param"].startswith("messages[0].content[0]")
            too_many = ask([audio_part(clip), audio_part(clip)])
            assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_audio"
    finally:
        engine.stop()


def test_a_model_without_audio_refuses_input_audio(tmp_path, tiny_llava):
    from polymodal.serve.chat import to_prompt
    from polymodal.serve.errors import APIError
    from polymodal.serve.media import MediaLimits
    from polymodal.serve.schemas import ChatRequest

    clip = write_tone(tmp_path / "a.wav", 500)
    body = ChatRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": [audio_part(clip)]}]})
    with pytest.raises(APIError, match="this model takes no audio"):
        to_prompt(body, tiny_llava, MediaLimits())
