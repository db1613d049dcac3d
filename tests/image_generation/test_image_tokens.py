"""Image codes as LLM tokens (image_generation/codes.py, engine/images.py), on a tiny drawing
model: a fresh model is the plain LLM; drawing samples and their loss; guidance; seeded,
batched and complete image blocks; save -> load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from polymodal.config import ModelConfig, from_dict
from polymodal.data.sample import Sample
from polymodal.engine.generate import Engine
from polymodal.engine.images import guided, unconditional_prompt
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.model import MultimodalLM
from polymodal.objectives.lm import lm_example
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate
from polymodal.processing.images import load_image

TOKENIZER = {"image_size": 16, "downsample": 4, "levels": [4, 4], "channels": [8, 8]}  # K = 16, C = 16
DRAW = [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": ""}]
PROMPTS = [{"messages": [{"role": "user", "content": "Draw a red circle."}]},
           {"messages": [{"role": "user", "content": "Draw a blue triangle, please."}]}]


def drawing_model(perturbed: bool = True, **output) -> MultimodalLM:
    """tiny:llama that draws through a tiny FSQ tokenizer; perturbed: its code head and rows get
    noise, so that it draws varied codes (fresh, the head's rows are zero)."""
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"},
                                     "image_output": {"tokenizer": TOKENIZER, **output}})
    torch.manual_seed(0)
    model = MultimodalLM(config).eval()
    if perturbed:
        torch.manual_seed(1)
        with torch.no_grad():
            model.llm.model.get_output_embeddings().codes.weight.normal_(0.0, 0.05)
    return model


def test_fresh_model_is_the_plain_llm():
    plain = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}})
    torch.manual_seed(0)
    reference = MultimodalLM(plain).eval()
    model = drawing_model(perturbed=False)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        expected = reference.llm.model(input_ids=ids).logits
        got = model.llm.model(input_ids=ids).logits
    vocab = model.image_codes.text_vocab
    assert got.shape[-1] == model.image_codes.vocab_size == vocab + 2 + 16
    assert torch.equal(got[..., :vocab], expected)
    assert torch.equal(got[..., vocab:], torch.zeros_like(got[..., vocab:]))  # never begins an image


def test_drawing_sample_block_and_labels():
    model = drawing_model()
    codes = model.image_codes
    example = lm_example(model, Sample("a", DRAW, draws=[f"{DATA}/red_circle.png"]))
    ids, labels = example["input_ids"], example["labels"]
    start = ids.index(codes.begin_id)
    block = ids[start : start + 18]
    assert block[-1] == codes.end_id and all(codes.first_code_id <= i < codes.vocab_size for i in block[1:-1])
    assert labels[start : start + 17] == block[:-1] and labels[start + 17] == -100  # the end is forced
    assert labels[start - 1] == -100 and labels[start + 18] != -100  # the prompt; end of turn learned
    expected = model.image_tokenizer.encode(load_image(f"{DATA}/red_circle.png", 16)[None])[0]
    assert block[1:-1] == codes.to_token_ids(expected).tolist()


def test_code_labels_score_over_the_codebook():
    model = drawing_model()
    example = lm_example(model, Sample("a", DRAW, draws=[f"{DATA}/red_circle.png"]))
    batch = collate([example, example], model.pad_id)
    output = model(batch)
    assert output.image_logits.shape == (32, 16) and output.logits.shape[0] == 2 * 2  # begin, end of turn
    hidden = model.hidden_states(batch)[:, :-1][output.image_mask]
    full = model.llm.lm_head(hidden)[:, model.image_codes.first_code_id :]
    assert torch.allclose(output.image_logits, full, atol=1e-5)
    per_token = torch.cat([F.cross_entropy(output.logits, output.targets, reduction="none"),
                           F.cross_entropy(output.image_logits, output.image_targets, reduction="none")])
    assert torch.allclose(next_token_loss(output), per_token.mean())


def test_trainable_parts_are_the_new_rows():
    model = drawing_model()
    model.set_trainable(["image_output"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "llm.model.lm_head.codes.weight", "llm.model.model.embed_tokens.codes.weight"]
    model.set_trainable(["image_tokenizer"])
    assert all(n.startswith("image_tokenizer.") for n, p in model.named_parameters() if p.requires_grad)


def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional():
    engine = Engine(drawing_model())
    logits, twin = torch.randn(3, 16), torch.randn(3, 16)
    assert torch.equal(guided(logits, twin, 1.0), logits)
    sampled = SamplingParams(temperature=1.0, seed=4)
    plain = engine.generate_images(PROMPTS, sampled, n=2)
    assert torch.equal(engine.generate_images(PROMPTS, SamplingParams(temperature=1.0, seed=4,
                                                                      guidance_scale=1.0), n=2), plain)
    # scale 0 samples from the twin alone: the unconditional prompt's own images
    blank = engine.generate_images([unconditional_prompt(p) for p in PROMPTS], sampled, n=2)
    zero = engine.generate_images(PROMPTS, SamplingParams(temperature=1.0, seed=4, guidance_scale=0.0), n=2)
    assert torch.equal(zero, blank) and not torch.equal(zero, plain)


def test_seeded_batched_and_varied():
    engine = Engine(drawing_model())
    params = SamplingParams(temperature=1.0, seed=7, guidance_scale=2.0)
    images = engine.generate_images(PROMPTS, params, n=3)
    assert images.shape == (6, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(engine.generate_images(PROMPTS, params, n=3), images)  # reproducible
    alone = torch.cat([engine.generate_images([prompt], params, n=3) for prompt in PROMPTS])
    assert torch.equal(alone, images)  # batched equals one by one
    for batch_size in (1, 2, 4, 6):  # a prompt's images split over calls (1-2), one call each (4), both in one (6)
        assert torch.equal(engine.generate_images_in_batches(PROMPTS, params, 3, batch_size), images)
    assert not torch.equal(images[0], images[1])  # samples of one prompt differ


def test_chat_image_blocks_are_always_complete():
    model = drawing_model()
    with torch.no_grad():  # make <begin_of_image> likely wherever text may go
        model.llm.model.get_output_embeddings().codes.weight[0].normal_(0.0, 5.0)
    codes = model.image_codes
    engine = Engine(model)
    for budget in (5, 18, 19, 40):
        answers = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=budget, temperature=1.0, seed=budget))
        for answer in answers:
            ids = answer.token_ids
            starts = [i for i, token in enumerate(ids) if token == codes.begin_id]
            for start in starts:  # begin, K codes, end: never cut, never left early
                assert [codes.is_code(torch.tensor(t)).item() for t in ids[start + 1 : start + 17]] == [True] * 16
                assert ids[start + 17] == codes.end_id
            assert len(answer.images) == len(starts)
            assert not any(codes.is_code(torch.tensor(t)).item() for i, t in enumerate(ids)
                           if not any(s < i <= s + 16 for s in starts))
        if budget < 18:
            assert all(not answer.images for answer in answers)
    assert any(answer.images for answer in engine.generate(PROMPTS * 2, SamplingParams(
        max_new_tokens=40, temperature=1.0, seed=40)))


def test_save_and_load_draw_the_same(tmp_path):
    model = drawing_model()
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    params = SamplingParams(temperature=1.0, seed=3, guidance_scale=1.5)
    assert torch.equal(Engine(loaded).generate_images(PROMPTS, params), Engine(model).generate_images(PROMPTS, params))


def test_errors_are_one_line():
    with pytest.raises(UserError, match="does not draw"):
        Engine(MultimodalLM(from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}}))).generate_images(PROMPTS)
