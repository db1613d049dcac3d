"""`tiny:ARCH?key=value&...`: tiny language models of chosen sizes (for models trained from
scratch at several scales, benchmarks/fusion_claims.py); bad keys and values name themselves."""

import pytest
import torch

from conftest import tiny_model
from polymodal import tiny
from polymodal.build import load_any
from polymodal.errors import UserError
from polymodal.sources import load_causal_lm, load_vision_model


def test_a_sized_source_builds_those_sizes_and_the_plain_one_is_unchanged():
    model, tokenizer = load_causal_lm("tiny:qwen2?hidden_size=96&num_hidden_layers=3&num_attention_heads=6"
                                      "&num_key_value_heads=3")
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (96, 3, 192)
    assert (config.num_attention_heads, config.num_key_value_heads) == (6, 3)
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, len(tokenizer))
    plain, _ = load_causal_lm("tiny:llama")
    reference, _ = tiny.causal_lm("llama")
    assert (plain.config.hidden_size, plain.config.intermediate_size, plain.config.num_hidden_layers) == (64, 128, 2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), reference.state_dict().values()))
    wide, _ = load_causal_lm("tiny:llama?intermediate_size=100")
    assert (wide.config.hidden_size, wide.config.intermediate_size) == (64, 100)


@pytest.mark.parametrize("source, message", [
    ("tiny:llama?hidden=128", r"unknown size hidden; known: hidden_size"),
    ("tiny:llama?hidden_size=big", r"hidden_size='big' is not a whole number"),
    ("tiny:llama?num_hidden_layers=0", r"num_hidden_layers=0 must be a whole number of at least 1"),
    ("tiny:llama?hidden_size=90", r"num_attention_heads=4 does not divide hidden_size=90"),
    ("tiny:llama?hidden_size=100", r"= 25 features per head must be even"),
    ("tiny:llama?num_key_value_heads=3", r"num_key_value_heads=3 does not divide num_attention_heads=4"),
    ("tiny:llama?hidden_size=64&hidden_size=64", r"hidden_size is given twice"),
    ("tiny:llama?hidden_size", r"'hidden_size' is not key=value"),
    ("tiny:gpt9?hidden_size=64", r"unknown tiny language architecture 'gpt9'"),
])
def test_bad_sizes_are_named(source, message):
    with pytest.raises(UserError, match=message):
        load_causal_lm(source)


def test_vision_towers_take_no_sizes():
    with pytest.raises(UserError, match=r"sizes are chosen for tiny language models only, not tiny:clip"):
        load_vision_model("tiny:clip?hidden_size=64")


def test_a_model_on_a_sized_llm_saves_and_loads(tmp_path):
    model = tiny_model({"kind": "patches", "image_size": 32, "patch_size": 16}, {"kind": "linear"},
                       {"source": "tiny:llama?hidden_size=32&num_hidden_layers=3&num_attention_heads=2"
                                  "&num_key_value_heads=1"})
    assert model.llm.model.config.num_hidden_layers == 3
    model.save_pretrained(tmp_path / "saved")
    again = load_any(str(tmp_path / "saved"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(again.llm.model(ids).logits, model.llm.model(ids).logits)
