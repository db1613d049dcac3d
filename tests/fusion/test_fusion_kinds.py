"""Every fusion kind inside the decoder, on tiny models: a fresh kind is the plain LLM; the
training forward, the batch runners and the server's slots agree; cached decoding equals
recomputing; batched equals one by one; save -> load is exact; the server answers 16 clients.

A kind joins by adding its config to KINDS (fusion options, the connector it reads)."""

from __future__ import annotations

import threading
from unittest.mock import patch

import pytest
import torch

from conftest import image
from polymodal.config import ModelConfig, from_dict
from polymodal.engine.batching import BatchingEngine
from polymodal.engine.generate import Engine
from polymodal.engine.runners import LlamaRunner, TransformersRunner
from polymodal.engine.sampling import SamplingParams
from polymodal.engine.slots import SlotCache
from polymodal.llm import LanguageModel
from polymodal.model import MultimodalLM
from polymodal.processing import collate

KINDS = {
    "cross_attention": ({"kind": "cross_attention", "every": 1}, {"kind": "perceiver", "num_latents": 4, "depth": 1, "heads": 2}),
    "moe": ({"kind": "moe"}, {"kind": "mlp"}),
    "moe-aware": ({"kind": "moe", "modality_aware": True}, {"kind": "mlp"}),
    "expert": ({"kind": "expert"}, {"kind": "mlp"}),
    "expert-plora": ({"kind": "expert", "rank": 4}, {"kind": "mlp"}),
    "adapter": ({"kind": "adapter", "layers": 1, "prompt_length": 4}, {"kind": "mlp"}),
}
CONTENTS = ["<image>What is in the picture?", "Describe it, please.", "<image>Colour? <image>And this one?"]


def fused_model(kind: str, perturbed: bool = True) -> MultimodalLM:
    """tiny:llama reading tiny:clip images through `kind`; perturbed: the kind's own weights
    get noise, so that it changes the answers (a fresh kind is the plain LLM)."""
    fusion, connector = KINDS[kind]
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "encoder": {"kind": "hf", "source": "tiny:clip"},
                                     "connector": connector, "fusion": fusion})
    torch.manual_seed(0)
    with patch("polymodal.model.LanguageModel", SharpLanguageModel):
        model = MultimodalLM(config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        if perturbed:
            for parameter in model.fusion.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


class SharpLanguageModel(LanguageModel):
    """The tiny LLM with larger random weights (answers that differ by prompt and by step; the
    default init repeats one token), drawn before the fusion kind copies or reads them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def prompts(count: int = 3) -> list[dict]:
    return [{"messages": [{"role": "user", "content": CONTENTS[i % 3]}],
             "images": [image(i + k) for k in range(CONTENTS[i % 3].count("<image>"))]} for i in range(count)]


def last_logits_by_training_forward(model, prompt: dict) -> torch.Tensor:
    """The training forward's logits [V] at the prompt's last position (one row, no padding)."""
    encoded = model.processor.encode(prompt["messages"], prompt["images"])
    batch = collate([encoded], model.pad_id)
    with torch.no_grad():
        return model.llm.lm_head(model.hidden_states(batch))[0, -1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_kind_gives_the_plain_llms_logits(kind):
    model = fused_model(kind, perturbed=False)
    for prompt in prompts():
        encoded = model.processor.encode(prompt["messages"], prompt["images"])
        batch = collate([encoded], model.pad_id)
        with torch.no_grad():
            fused = model.hidden_states(batch)
            plain = model.llm.decoder(inputs_embeds=model.embed(batch.input_ids, batch.media)).last_hidden_state
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_runners_and_server_slots_agree(kind):
    model = fused_model(kind)
    engine = Engine(model)
    encoded = [engine.encode(p) for p in prompts()]
    trained = torch.stack([last_logits_by_training_forward(model, p) for p in prompts()])  # [3, V]
    batch = collate(encoded, model.pad_id, left_pad=True)
    slots = SlotCache(model.llm.model, max_batch=4, max_length=128)
    with torch.no_grad():
        for runner in (LlamaRunner(model.llm.model), TransformersRunner(model.llm.model)):
            embeds, fusion = model.prepare(batch.input_ids, batch.media)
            prefilled = runner.prefill(embeds, batch.attention_mask, embeds.shape[1] + 2, fusion, batch.input_ids)
            torch.testing.assert_close(prefilled, trained, rtol=1e-4, atol=1e-4)
        for row, sample in enumerate(encoded):
            ids = torch.tensor([sample["input_ids"]])
            embeds, fusion = model.prepare(ids, sample["media"])
            torch.testing.assert_close(slots.admit(embeds, fusion, ids)[0], trained[row], rtol=1e-4, atol=1e-4)
    fresh = fused_model(kind, perturbed=False)
    plain = torch.stack([last_logits_by_training_forward(fresh, p) for p in prompts()])
    assert not torch.allclose(trained, plain, atol=1e-3)  # the kind is at work in what was compared


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_recomputing_and_batched_equals_one_by_one(kind):
    model = fused_model(kind)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    cached = Engine(model).generate(prompts(), params)
    uncached = Engine(model, use_cache=False).generate(prompts(), params)
    single = [Engine(model).generate([p], params)[0] for p in prompts()]
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached] == [s.token_ids for s in single]
    assert len({tuple(c.token_ids) for c in cached}) > 1  # the answers differ: a real comparison
    plain = Engine(fused_model(kind, perturbed=False)).generate(prompts(), params)
    assert [c.token_ids for c in cached] != [p.token_ids for p in plain]  # the kind changed answers


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_the_same_logits(kind, tmp_path):
    model = fused_model(kind)
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    for prompt in prompts():
        assert torch.equal(last_logits_by_training_forward(model, prompt),
                           last_logits_by_training_forward(loaded, prompt))


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_gives_16_concurrent_clients_their_sequential_answers(kind):
    model = fused_model(kind)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    asked = prompts(16)
    alone = [Engine(model).generate([p], params)[0].text for p in asked]
    engine = BatchingEngine(model, max_batch=4, max_queue=32).start()
    answers = [None] * len(asked)

    def client(index):
        request = engine.submit(asked[index], params)
        answers[index] = "".join(value for event, value in request.events(timeout=60) if event == "text")

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(asked))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.stop()
    assert answers == alone


@pytest.mark.parametrize("kind", ["adapter", "expert-plora", "cross_attention", "moe-aware"])
def test_training_the_fusion_resumes_identically_and_saves_under_its_own_prefix(kind, tmp_path, monkeypatch):
    from test_train import MODEL, synthetic_dataset, weights

    from conftest import interrupted_run
    from polymodal.config import RecipeConfig
    from polymodal.train.run import train

    data = [{"format": "llava", "path": str(synthetic_dataset(tmp_path))}]
    fusion = KINDS[kind][0]
    config = from_dict(RecipeConfig, {"name": "fusion", "model": {**MODEL, "fusion": fusion},
                                      "checkpoint": {"every": 2, "keep": 1}, "stages": [
        {"name": "tune", "train": ["connector", "fusion"], "lr": {"connector": 1e-3, "fusion": 1e-2},
         "steps": 4, "batch_size": 4, "log_every": 1, "data": data}]})
    train(config, tmp_path / "straight")
    interrupted_run(monkeypatch, config, tmp_path / "resumed", at_call=3)  # after the step-2 checkpoint
    train(config, tmp_path / "resumed", resume=True)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    fresh = MultimodalLM(config.model).state_dict()
    trained = [name for name in straight if name.startswith("fusion.")]
    assert trained and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(straight[name], fresh[name]) for name in trained)  # the fusion learned
    assert {name for name in straight if not name.startswith("fusion.")} <= set(fresh)  # LLM keys as before
