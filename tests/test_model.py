"""MultimodalLM: processing, the label-only loss, save/load, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import image, tiny_model
from polymodal.errors import UserError
from polymodal.model import MultimodalLM
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate
from polymodal.processing.collate import IGNORE

CONVERSATION = [
    {"role": "user", "content": "<image>What colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the shape?"},
    {"role": "assistant", "content": "circle"},
]


def test_labels_cover_only_assistant_turns(tiny_llava):
    sample = tiny_llava.processor.encode_for_training(CONVERSATION, [image()])
    tokenizer = tiny_llava.llm.tokenizer
    labelled = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE]
    # The last answer ends at its end-of-turn token: the template's "\n" after it is never generated.
    assert tokenizer.decode(labelled) == "red<|im_end|>\ncircle<|im_end|>"
    ids = sample["input_ids"]
    assert ids.count(tiny_llava.llm.image_token_id) == tiny_llava.tokens_per_image
    # The same ids as rendering the whole conversation at once.
    whole = tiny_llava.llm.render(CONVERSATION, add_generation_prompt=False)
    expected = tiny_llava.processor._expand(tokenizer(whole, add_special_tokens=False)["input_ids"], 1)
    assert ids == expected[:-1] and tokenizer.decode(expected[-1:]) == "\n"


def test_content_parts_equal_inline_placeholders(tiny_llava):
    picture = image(5)
    parts = [{"role": "user", "content": [{"type": "image", "image": picture},
                                          {"type": "text", "text": "What colour is the circle?"}]}]
    inline = [{"role": "user", "content": "<image>What colour is the circle?"}]
    a = tiny_llava.processor.encode(parts)
    b = tiny_llava.processor.encode(inline, [picture])
    assert a["input_ids"] == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_loss_at_label_positions_equals_full_logits_loss(tiny_llava):
    batch = collate([tiny_llava.processor.encode_for_training(CONVERSATION, [image()]),
                     tiny_llava.processor.encode_for_training(CONVERSATION[:2], [image(1)])],
                    tiny_llava.pad_id)
    ours = next_token_loss(tiny_llava(batch))
    embeds = tiny_llava.embed(batch.input_ids, batch.media)
    logits = tiny_llava.llm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                ignore_index=IGNORE)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [None, {"r": 2}])
def test_save_then_load_gives_identical_logits(tmp_path, lora):
    model = tiny_model({"kind": "hf", "source": "tiny:siglip"}, {"kind": "pixel_shuffle"},
                       {"lora": lora} if lora else None)
    with torch.no_grad():  # make LoRA's B non-zero so the adapters matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    batch = collate([model.processor.encode_for_training(CONVERSATION, [image()])], model.pad_id)
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir() if not p.name.startswith(".")) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = MultimodalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        embeds = [m.embed(batch.input_ids, batch.media) for m in (model, loaded)]
        logits = [m.llm.model(inputs_embeds=e).logits for m, e in zip((model, loaded), embeds)]
    assert torch.equal(logits[0], logits[1])
    assert loaded.llm.tokenizer.convert_tokens_to_ids("<image>") == model.llm.image_token_id


def test_image_token_resizes_embeddings_only_when_needed():
    model = tiny_model()  # tiny:llama's vocabulary is exactly full
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    assert model.llm.image_token_id == len(model.llm.tokenizer) - 1 < rows
    assert rows % 64 == 0
    # Adding the placeholder again (a saved tokenizer already has it) changes nothing.
    from polymodal.llm import add_placeholder_token
    assert add_placeholder_token(model.llm.tokenizer, model.llm.model, "<image>") == model.llm.image_token_id
    assert model.llm.model.get_input_embeddings().weight.shape[0] == rows


def test_placeholder_and_image_counts_must_match(tiny_llava):
    with pytest.raises(UserError, match=r"2 image\(s\) given but 1 <image> placeholder"):
        tiny_llava.processor.encode([{"role": "user", "content": "<image>hi"}], [image(), image(1)])
    with pytest.raises(UserError, match=r"0 image\(s\) given but 1"):
        tiny_llava.processor.encode([{"role": "user", "content": "<image>hi"}])


def test_text_only_model_refuses_images():
    model = tiny_model()
    with pytest.raises(UserError, match="no image encoder"):
        model.processor.encode([{"role": "user", "content": "<image>hi"}], [image()])


def test_bad_model_directory(tmp_path):
    with pytest.raises(UserError, match=r"no config\.json"):
        MultimodalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        MultimodalLM.from_pretrained(tmp_path)


def test_parts_built_at_random_start_the_same_however_the_llm_loads(tmp_path, monkeypatch):
    """transformers' safetensors load draws random numbers and its GGUF load does not, so
    without care a run's first load of a GGUF file (dequantized) built other adapters,
    encoder and connector than later runs reading its cached copy: another model trained."""
    from polymodal import sources

    llm, tokenizer = sources.load_causal_lm("tiny:llama")
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    parts = ({"kind": "cnn", "image_size": 32, "channels": [8, 16]}, {"kind": "mlp", "depth": 2},
             {"source": str(tmp_path / "llm"), "lora": {"r": 2}})
    plain = tiny_model(*parts)
    load = sources.load_causal_lm

    def load_drawing_more(*args, **kwargs):
        torch.rand(1000)  # loading draws 1,000 more random numbers than before
        return load(*args, **kwargs)

    monkeypatch.setattr(sources, "load_causal_lm", load_drawing_more)
    drawing = tiny_model(*parts)
    built_at_random = [name for name, _ in plain.named_parameters()
                       if not name.startswith("llm.") or "lora_" in name]
    assert any("lora_A" in name for name in built_at_random) and any("connector" in n for n in built_at_random)
    params = dict(drawing.named_parameters())
    for name, parameter in plain.named_parameters():
        if name in built_at_random:
            assert torch.equal(parameter, params[name]), name


def test_a_connector_config_error_names_the_modality_s_connector():
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.connectors\.image\.depth: must be at least 1"):
        tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "depth": 0})
