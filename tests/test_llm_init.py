"""`llm: {init: random}`: the source's architecture and tokenizer with re-drawn weights, the
control of the "does the LLM help" study (benchmarks/series_llm.py)."""

import torch

from conftest import tiny_model
from polymodal.model import MultimodalLM


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.llm.model.state_dict().items()}


def test_random_init_redraws_every_weight_seeded_and_keeps_the_tokenizer():
    pretrained = _weights(tiny_model())
    first = tiny_model(llm={"init": "random", "init_seed": 3})
    again, other = _weights(tiny_model(llm={"init": "random", "init_seed": 3})), _weights(
        tiny_model(llm={"init": "random", "init_seed": 4}))
    drawn = _weights(first)
    assert drawn.keys() == pretrained.keys()
    linear = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(drawn[linear], pretrained[linear])
    assert not torch.equal(drawn["model.embed_tokens.weight"], pretrained["model.embed_tokens.weight"])
    assert torch.equal(drawn["model.norm.weight"], torch.ones_like(drawn["model.norm.weight"]))
    std = first.llm.model.config.initializer_range
    assert abs(drawn[linear].std().item() - std) < 0.25 * std  # the model's own initialiser
    assert all(torch.equal(drawn[name], again[name]) for name in drawn)  # seeded
    assert not torch.equal(drawn[linear], other[linear])
    head, embeddings = first.llm.model.get_output_embeddings(), first.llm.model.get_input_embeddings()
    assert head.weight.data_ptr() == embeddings.weight.data_ptr()  # still tied
    assert first.llm.tokenizer.get_vocab() == tiny_model().llm.tokenizer.get_vocab()


def test_random_init_does_not_move_the_global_generator():
    tiny_model(llm={"init": "random"})  # seeds the generator with 0, then builds
    after_random = torch.rand(3)
    tiny_model()
    assert torch.equal(after_random, torch.rand(3))  # parts built after the LLM start the same


def test_a_saved_random_model_loads_its_own_weights(tmp_path):
    model = tiny_model(llm={"init": "random", "init_seed": 5})
    model.save_pretrained(tmp_path / "model")
    loaded = MultimodalLM.from_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.llm.model(ids).logits, loaded.llm.model(ids).logits)
