"""Image output kind `flow` (MAR's continuous head, image_generation/flow_head.py): the head
learns a toy distribution and samples it; seeded, guided, batched; the drawing model's block,
inputs and loss; the runners' hidden states equal the training forward's; a few steps of
objective lm lower the loss; save -> load."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA
from polymodal.config import FlowHeadConfig, ModelConfig, StageConfig, from_dict
from polymodal.data.sample import Sample
from polymodal.engine.generate import Engine
from polymodal.engine.images import unconditional_prompt
from polymodal.engine.runners import make_runner
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import ConfigError
from polymodal.image_generation.flow_head import DRAWN_LATENTS, FlowHead
from polymodal.model import MultimodalLM
from polymodal.objectives.lm import LanguageModeling, lm_example
from polymodal.processing import collate
from polymodal.processing.images import load_image

TOKENIZER = {"kind": "continuous", "image_size": 16, "downsample": 4, "channels": [8, 8],
             "latent_dim": 4}  # K = 16 latents of 4 floats
FLOW = {"width": 32, "depth": 2, "sampling_steps": 4}
DRAW = [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": ""}]
STAGE_DATA = [{"format": "llava", "path": "unused.json"}]  # a stage needs one; these tests build batches
PROMPTS = [{"messages": [{"role": "user", "content": "Draw a red circle."}]},
           {"messages": [{"role": "user", "content": "Draw a blue triangle, please."}]}]


def flow_model(perturbed: bool = True) -> MultimodalLM:
    """tiny:llama drawing through a tiny continuous tokenizer and a small flow head; perturbed:
    the head's zero-initialised output and modulations get noise, so that its velocity depends
    on the condition (fresh, it is zero)."""
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"},
                                     "image_output": {"kind": "flow", "tokenizer": TOKENIZER, "flow": FLOW}})
    torch.manual_seed(0)
    model = MultimodalLM(config).eval()
    if perturbed:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, parameter in model.image_flow.head.named_parameters():
                if "modulation" in name or name.startswith("output"):
                    parameter.normal_(0.0, 0.3)
    return model


def toy_condition(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditions [rows, 8], latents [rows, 2]): condition 0 -> N((2, -2), 0.1^2), 1 -> N((-2, 2), 0.1^2)."""
    which = torch.arange(rows) % 2
    condition = torch.nn.functional.one_hot(which, 8).float()
    centre = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])[which]
    return condition, centre + 0.1 * torch.randn(rows, 2)


def test_head_learns_a_toy_distribution_and_samples_it():
    torch.manual_seed(0)
    head = FlowHead(hidden_size=8, latent_dim=2, width=32, depth=2)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
    losses = []
    for _ in range(120):
        condition, latents = toy_condition(64)
        loss = head.loss(latents, condition, draws=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    condition, _ = toy_condition(128)
    samples = head.sample(condition, steps=20, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (128, 2)
    assert torch.allclose(samples[0::2].mean(0), torch.tensor([2.0, -2.0]), atol=0.4)
    assert torch.allclose(samples[1::2].mean(0), torch.tensor([-2.0, 2.0]), atol=0.4)
    assert float(samples.std(0).max()) > 1 and float(samples[0::2].std(0).max()) < 0.3  # the spread too


def test_head_sampling_seeded_guided_and_row_by_row():
    torch.manual_seed(0)
    head = FlowHead(hidden_size=8, latent_dim=3, width=16, depth=1)
    with torch.no_grad():
        head.output.weight.normal_(0.0, 0.5)
        head.final_modulation[1].weight.normal_(0.0, 0.5)
    condition, unconditional = torch.randn(4, 8), torch.randn(4, 8)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in range(4)]

    plain = head.sample(condition, 5, generators())
    assert plain.shape == (4, 3)
    assert torch.equal(head.sample(condition, 5, generators()), plain)  # seeded
    assert torch.equal(head.sample(condition, 5, generators(), guidance=(unconditional, 1.0)), plain)
    alone = torch.cat([head.sample(condition[i : i + 1], 5, [generators()[i]]) for i in range(4)])
    assert torch.allclose(alone, plain, atol=1e-6)  # a row draws the same alone
    zero = head.sample(condition, 5, generators(), guidance=(unconditional, 0.0))
    assert torch.allclose(zero, head.sample(unconditional, 5, generators()), atol=1e-6)
    assert not torch.allclose(zero, plain, atol=1e-3)
    still = head.sample(condition, 5, generators(), temperature=0.0)  # no noise: one latent per condition
    assert torch.equal(still, head.sample(condition, 5, None, temperature=0.0))


def test_drawing_sample_block_inputs_and_loss():
    model = flow_model()
    flow = model.image_flow
    example = lm_example(model, Sample("a", DRAW, draws=[f"{DATA}/red_circle.png"]))
    ids, labels = example["input_ids"], example["labels"]
    start = ids.index(flow.layout.begin_id)
    assert ids[start : start + 18] == flow.block() and flow.latent_id == flow.layout.text_vocab + 2
    assert labels[start : start + 17] == ids[start : start + 17] and labels[start + 17] == -100
    expected = model.image_tokenizer.encode_latents(load_image(f"{DATA}/red_circle.png", 16)[None])
    latents = example["media"][DRAWN_LATENTS]
    assert latents.shape == (1, 16, 4) and torch.allclose(latents, expected)
    batch = collate([example, example], model.pad_id)
    embeds = model.embed(batch.input_ids, batch.media)  # latent k's position reads its projection
    assert torch.allclose(embeds[1, start + 1 : start + 17], flow.latent_embeddings(latents[0]), atol=1e-6)
    output = model(batch)
    assert output.logits.shape[0] == 2 * 2  # begin, end of turn: the latents are the head's
    hidden = model.hidden_states(batch)[:, start : start + 16].reshape(32, -1)  # begin .. latent 14
    torch.manual_seed(5)
    expected_loss = flow.head.loss(latents.repeat(2, 1, 1).reshape(32, 4), hidden, flow.config.noise_draws)
    torch.manual_seed(5)
    assert torch.allclose(model(batch).aux_loss, expected_loss, atol=1e-6)


@pytest.mark.parametrize("runner_name", ["llama", "transformers"])
def test_runner_hidden_states_equal_the_training_forward(runner_name):
    model = flow_model()
    example = lm_example(model, Sample("a", DRAW, draws=[f"{DATA}/red_circle.png"]))
    batch = collate([example], model.pad_id)
    start = example["input_ids"].index(model.image_flow.layout.begin_id)
    with torch.no_grad():
        expected = model.hidden_states(batch)[0, start : start + 16]  # [16, D]: begin, latents 0..14
        runner = make_runner(model.llm.model, runner_name)
        runner.output_hidden = True
        prefix = batch.input_ids[:, : start + 1]
        got = [runner.prefill(model.embed(prefix), torch.ones_like(prefix), start + 20)]
        latents = example["media"][DRAWN_LATENTS][0]
        for k in range(15):
            inputs = model.image_flow.latent_embeddings(latents[k : k + 1])
            got.append(runner.step_embeddings(inputs, torch.tensor([model.image_flow.latent_id])))
    assert torch.allclose(torch.cat(got), expected, atol=1e-5)


def test_generate_images_seeded_batched_and_guided():
    engine = Engine(flow_model())
    params = SamplingParams(temperature=1.0, seed=7, guidance_scale=2.0)
    images = engine.generate_images(PROMPTS, params, n=2)
    assert images.shape == (4, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(engine.generate_images(PROMPTS, params, n=2), images)  # reproducible
    alone = torch.cat([engine.generate_images([prompt], params, n=2) for prompt in PROMPTS])
    assert torch.allclose(alone, images, atol=1e-5)  # batched equals one by one
    assert not torch.allclose(images[0], images[1], atol=1e-3)  # samples of one prompt differ
    sampled = SamplingParams(temperature=1.0, seed=4)
    plain = engine.generate_images(PROMPTS, sampled)
    assert torch.equal(engine.generate_images(PROMPTS, SamplingParams(temperature=1.0, seed=4,
                                                                      guidance_scale=1.0)), plain)
    blank = engine.generate_images([unconditional_prompt(p) for p in PROMPTS], sampled)
    zero = engine.generate_images(PROMPTS, SamplingParams(temperature=1.0, seed=4, guidance_scale=0.0))
    assert torch.allclose(zero, blank, atol=1e-5) and not torch.allclose(zero, plain, atol=1e-3)


def test_a_fresh_flow_model_is_the_plain_llm():
    torch.manual_seed(0)
    reference = MultimodalLM(from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}})).eval()
    model = flow_model(perturbed=False)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        expected = reference.llm.model(input_ids=ids).logits
        got = model.llm.model(input_ids=ids).logits
    vocab = model.image_flow.layout.text_vocab
    assert got.shape[-1] == vocab + 2  # the two markers; latents have no logits
    assert torch.equal(got[..., :vocab], expected)
    assert torch.equal(got[..., vocab:], torch.zeros_like(got[..., vocab:]))  # never begins an image


def test_training_through_objective_lm_lowers_the_loss():
    model = flow_model(perturbed=False)
    stage = from_dict(StageConfig, {"name": "draw", "train": ["image_output"], "data": STAGE_DATA,
                                    "lr": {"image_output": 3e-3}})
    objective = LanguageModeling(stage, model)
    objective.set_trainable(model)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {name.split(".")[0] for name in trained} == {"llm", "image_flow"}
    assert {name for name in trained if name.startswith("llm.")} == {  # the markers' rows
        "llm.model.lm_head.codes.weight", "llm.model.model.embed_tokens.codes.weight"}
    memo = {}
    samples = [Sample(str(i), DRAW, draws=[f"{DATA}/{name}.png"])
               for i, name in enumerate(["red_circle", "blue_square"])]
    batch = objective.batch([objective.example(sample, memo) for sample in samples])
    optimizer = torch.optim.Adam(objective.parameter_groups(model))

    def loss() -> torch.Tensor:
        torch.manual_seed(3)  # the same noise draws before and after
        return objective.loss(model, batch).loss

    before = loss().item()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * before


def test_save_and_load_draw_the_same(tmp_path):
    model = flow_model()
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    params = SamplingParams(temperature=1.0, seed=3, guidance_scale=1.5)
    drawn = Engine(loaded).generate_images(PROMPTS, params)
    assert torch.equal(drawn, Engine(model).generate_images(PROMPTS, params))


def test_config_errors():
    with pytest.raises(ConfigError, match="sampling_steps"):
        FlowHeadConfig(sampling_steps=0)
    with pytest.raises(ConfigError, match="loss_weight"):
        FlowHeadConfig(loss_weight=0.0)


def test_share_prefix_keeps_drawings_whole_and_the_loss():
    model = flow_model()
    questions = [Sample(f"q{i}", [{"role": "user", "content": f"What colour is it? {i}"},
                                  {"role": "assistant", "content": "red"}]) for i in range(3)]
    drawings = [Sample(f"d{i}", DRAW, draws=[f"{DATA}/{name}.png"])
                for i, name in enumerate(["red_circle", "blue_square"])]
    losses = []
    for share_prefix in (None, 4):
        stage = from_dict(StageConfig, {"name": "draw", "train": ["image_output"], "data": STAGE_DATA,
                                        "lr": {"image_output": 1e-3}, "share_prefix": share_prefix})
        objective = LanguageModeling(stage, model)
        batch = objective.batch([objective.example(sample, {}) for sample in questions + drawings])
        assert len(batch.input_ids) == (5 if share_prefix is None else 3)  # the questions in one row
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(objective.loss(model, batch).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
