"""Model sources: local directories (the path hub ids take too), no pickles, clear errors."""

import pytest
import torch

from conftest import image, tiny_model
from polymodal import tiny
from polymodal.errors import UserError
from polymodal.sources import load_causal_lm, load_vision_model, locate


def test_local_llm_directory_loads_with_its_tokenizer(tmp_path):
    model, tokenizer = tiny.causal_lm("qwen2")
    model.save_pretrained(tmp_path)  # safetensors
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer("hi")["input_ids"] == tokenizer("hi")["input_ids"]


def test_local_vision_directory_becomes_an_encoder(tmp_path):
    tiny.vision_model("dinov2").save_pretrained(tmp_path / "dino")
    model = tiny_model({"kind": "hf", "source": str(tmp_path / "dino")}, {"kind": "mlp"})
    reference = tiny_model({"kind": "hf", "source": "tiny:dinov2"}, {"kind": "mlp"})
    pixels = image()[None]
    assert torch.equal(model.encoder(pixels), reference.encoder(pixels))
    _, (size, mean, _std) = load_vision_model(str(tmp_path / "dino"))
    assert (size, mean) == (32, (0.485, 0.456, 0.406))


def test_pickled_checkpoints_are_refused(tmp_path):
    model, tokenizer = tiny.causal_lm("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle, the only weights
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="could not load"):
        load_causal_lm(str(tmp_path))


def test_not_a_vision_model(tmp_path):
    model, _tokenizer = tiny.causal_lm("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="is a 'llama' model; vision encoders: clip"):
        load_vision_model(str(tmp_path))


@pytest.mark.parametrize("source, message", [
    ("./no/such/dir", "model source not found"),
    ("gguf:/no/such.gguf", "GGUF file not found"),
    ("pkg:no_such_package/x", "pip install --no-deps no-such-package"),
])
def test_missing_sources_are_named(source, message):
    with pytest.raises(UserError, match=message):
        locate(source)


def test_a_hub_id_is_passed_to_transformers(monkeypatch):
    monkeypatch.setattr("polymodal.sources.check_hub_reachable", lambda hub_id: None)
    assert locate("HuggingFaceTB/SmolLM2-135M-Instruct").hub_id


def test_an_uncached_hub_id_offline_fails_before_any_download_pointing_at_offline_sources(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(UserError, match=r"not in the local cache.*HF_HUB_OFFLINE.*pkg:PACKAGE/PATH"):
        locate("no-such-org/no-such-model")


def test_a_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(UserError, match=r"not a model directory \(no config\.json\)"):
        locate(str(tmp_path))
