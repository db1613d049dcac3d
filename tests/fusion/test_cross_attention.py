"""`cross_attention` (Flamingo) beyond the parity tests every kind passes: media masking (text
before the first image sees none; a second image replaces the first), media keys and values
computed once per request, and the config's refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import image
from fusion.test_fusion_kinds import fused_model, prompts
from polymodal.config import ModelConfig, from_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.engine.slots import SlotCache
from polymodal.errors import UserError
from polymodal.model import MultimodalLM
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate


def encoded_batch(model: MultimodalLM, content: str, images: list):
    return collate([model.processor.encode([{"role": "user", "content": content}], images)], model.pad_id)


def image_positions(model: MultimodalLM, input_ids: torch.Tensor) -> list[int]:
    return (input_ids[0] == model.placeholder_ids["image"]).nonzero().squeeze(-1).tolist()


def test_text_before_the_first_image_sees_no_image():
    model = fused_model("cross_attention")  # gates drawn away from 0: the blocks are at work
    assert all(float(block.attention_gate.detach().abs()) > 0.01 for block in model.fusion.blocks.values())
    batch = encoded_batch(model, "Look at this picture: <image> What colour is it?", [image(0)])
    first = image_positions(model, batch.input_ids)[0]
    with torch.no_grad():
        fused = model.hidden_states(batch)  # [1, T, D]
        plain = model.llm.decoder(inputs_embeds=model.embed(batch.input_ids, batch.media)).last_hidden_state
    torch.testing.assert_close(fused[:, :first], plain[:, :first], rtol=0, atol=1e-6)
    assert (fused[:, first:] - plain[:, first:]).abs().amax(-1).min() > 1e-3  # from the image on, it reads it


def test_a_text_only_prompt_gives_the_plain_llms_hidden_states():
    model = fused_model("cross_attention")
    batch = encoded_batch(model, "What is the capital of France?", [])
    with torch.no_grad():
        plain = model.llm.decoder(inputs_embeds=model.embed(batch.input_ids, batch.media)).last_hidden_state
        torch.testing.assert_close(model.hidden_states(batch), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("immediate", [True, False])
def test_a_second_image_replaces_the_first_for_the_tokens_after_it(immediate):
    model = fused_model("cross_attention")
    model.fusion.config.only_attend_immediate_media = immediate
    content = "<image>Colour? <image>And this one?"
    outputs = []
    for first_image in (image(0), image(5)):
        batch = encoded_batch(model, content, [first_image, image(1)])
        embeds, state = model.prepare(batch.input_ids, batch.media)
        hidden = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))  # the same input
        with torch.no_grad(), state.call(batch.input_ids):
            outputs.append(model.fusion.before_layer(0, hidden))  # the block before layer 0: [1, T, D]
    first, second = image_positions(model, batch.input_ids)
    between = (outputs[0][:, first:second] - outputs[1][:, first:second]).abs().amax()
    after = (outputs[0][:, second:] - outputs[1][:, second:]).abs().amax()
    assert between > 1e-3  # tokens between the images read image 1
    if immediate:  # open_flamingo's only_attend_immediate_media: image 2 replaces image 1
        assert after == 0
    else:  # every image before a token: image 1 still counts after image 2
        assert after > 1e-3


def test_training_opens_the_gates_of_a_fresh_model():
    """Flamingo's zero-initialised tanh gates: at 0 the block adds nothing, but the loss's
    gradient reaches the gates (and through them, after a step, the attention and keys)."""
    model = fused_model("cross_attention", perturbed=False).train()
    question = {"role": "user", "content": "<image>What colour is it?"}
    batch = collate([model.processor.encode_for_training([question, {"role": "assistant", "content": answer}], [image(i)])
                     for i, answer in enumerate(["Blue.", "Red"])], model.pad_id)
    next_token_loss(model(batch)).backward()
    for block in model.fusion.blocks.values():
        for gate in (block.attention_gate, block.feed_forward_gate):
            assert gate.grad is not None and bool(torch.isfinite(gate.grad).all()) and float(gate.grad.abs()) > 0
        assert float(block.key_value.weight.grad.abs().max()) == 0  # gated off until the gates open


def count_key_value_rows(model: MultimodalLM) -> list[int]:
    """The rows of media each call of any block's key/value projection computes (a list that
    grows as they run)."""
    rows: list[int] = []
    for block in model.fusion.blocks.values():
        block.key_value.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


def test_media_keys_and_values_are_computed_once_per_request_in_a_generation():
    model = fused_model("cross_attention")
    rows = count_key_value_rows(model)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    results = Engine(model).generate(prompts(3), params)
    assert all(len(result.token_ids) == 16 for result in results)
    blocks = len(model.fusion.blocks)
    assert len(rows) == blocks  # one call per block, in the prefill; none in the 15 decode steps
    assert sum(rows) == 3 * blocks  # the three requests' rows (shared prefixes would only be fewer)


def test_media_keys_and_values_are_computed_once_per_request_in_the_servers_slots():
    model = fused_model("cross_attention")
    engine = Engine(model)
    slots = SlotCache(model.llm.model, max_batch=4, max_length=128)
    rows = count_key_value_rows(model)
    next_ids: list[int] = []
    with torch.no_grad():
        for prompt in prompts(3):  # requests join one by one next to the running ones
            encoded = engine.encode(prompt)
            ids = torch.tensor([encoded["input_ids"]])
            embeds, fusion = model.prepare(ids, encoded["media"])
            next_ids.append(int(slots.admit(embeds, fusion, ids).argmax()))
            for _ in range(5):  # every running row decodes
                next_ids = slots.step(torch.tensor(next_ids)).argmax(-1).tolist()
    with_images = sum(1 for prompt in prompts(3) if prompt["images"])
    assert with_images == 2  # the text-only request in between must not cost the others theirs
    assert rows == [1] * (with_images * len(model.fusion.blocks))  # each request's own row, once per block


def model_config(fusion: dict) -> ModelConfig:
    return from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "encoder": {"kind": "hf", "source": "tiny:clip"},
                                   "connector": {"kind": "perceiver", "num_latents": 4, "depth": 1, "heads": 2},
                                   "fusion": fusion})


@pytest.mark.parametrize(("fusion", "message"), [
    ({"kind": "cross_attention", "every": 4}, "model.fusion.every: 4 puts no block in an LLM of 2 layers"),
    ({"kind": "cross_attention", "every": 0}, "model.fusion.every: 0 must be 1 or more"),
    ({"kind": "cross_attention", "every": 1, "heads": 3}, "model.fusion.heads: 3 heads do not divide"),
])
def test_a_config_that_places_no_block_or_splits_no_heads_is_refused_in_one_line(fusion, message):
    with pytest.raises(UserError, match=message):
        MultimodalLM(model_config(fusion))


def test_the_text_holds_one_placeholder_per_image():
    model = fused_model("cross_attention")
    batch = encoded_batch(model, "<image>Colour? <image>And this one?", [image(0), image(1)])
    assert len(image_positions(model, batch.input_ids)) == 2
    assert model.connectors["image"].num_tokens == 4  # the perceiver's latents reach the blocks instead
