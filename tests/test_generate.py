"""The generation path: KV cache parity, batching parity, runners, sampling, stop strings, streaming."""

import pytest
import torch

from conftest import image, tiny_model
from polymodal.engine.generate import Generator
from polymodal.engine.runners import HFRunner, LlamaRunner
from polymodal.engine.sampling import SamplingParams, choose_next
from polymodal.engine.text import TextTracker
from polymodal.errors import UserError

QUESTIONS = ["What is in the picture?", "Describe it in detail, please.", "Colour?"]


def prompts(count=3):
    return [{"messages": [{"role": "user", "content": f"<image>{QUESTIONS[i % 3]}"}], "images": [image(i)]}
            for i in range(count)]


@pytest.fixture(params=["tiny:llama", "tiny:qwen2"])
def model(request):
    model = tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp"}, {"source": request.param})
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: answers that differ by prompt and by step
        for parameter in model.llm.model.parameters():  # (the default init repeats one token)
            parameter.normal_(0, 0.3)
    return model


def test_cached_generation_equals_recomputing_every_step(model):
    params = SamplingParams(max_new_tokens=12)
    cached = Generator(model).generate(prompts(), params)
    uncached = Generator(model, use_cache=False).generate(prompts(), params)
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]
    assert all(len(c.token_ids) > 0 for c in cached)
    assert len({tuple(c.token_ids) for c in cached}) > 1  # the answers differ: a real comparison


def test_batched_generation_equals_one_by_one(model):
    params = SamplingParams(max_new_tokens=12)
    generator = Generator(model)
    batched = generator.generate(prompts(), params)
    single = [generator.generate([p], params)[0] for p in prompts()]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert len({len(generator.encode(p)["input_ids"]) for p in prompts()}) > 1  # padding happened


def test_llama_runner_matches_transformers_forward(model):
    generator = Generator(model)
    batch_prompts = prompts()
    from polymodal.processing import collate
    batch = collate([generator.encode(p) for p in batch_prompts], model.pad_id, left_pad=True)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad():
        ours, theirs = LlamaRunner(model.llm.model), HFRunner(model.llm.model)
        length = embeds.shape[1] + 3
        torch.testing.assert_close(ours.prefill(embeds, batch["attention_mask"], length),
                                   theirs.prefill(embeds, batch["attention_mask"], length), rtol=1e-4, atol=1e-4)
        token = torch.tensor([5, 6, 7])
        for _ in range(3):
            torch.testing.assert_close(ours.step(token), theirs.step(token), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_llava):
    generator = Generator(tiny_llava)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    first = generator.generate(prompts(2), sampled)
    again = generator.generate(prompts(2), sampled)
    assert [a.token_ids for a in first] == [b.token_ids for b in again]
    greedy = generator.generate(prompts(2), SamplingParams(max_new_tokens=10))
    top1 = generator.generate(prompts(2), SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0))
    assert [a.token_ids for a in greedy] == [b.token_ids for b in top1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.75)
    drawn = {int(choose_next(logits, params, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}


def test_stream_pieces_join_to_the_answer_and_stop_strings_cut(tiny_llava):
    generator = Generator(tiny_llava)
    params = SamplingParams(max_new_tokens=16)
    [full] = generator.generate(prompts(1), params)
    pieces = list(generator.stream(prompts(1)[0], params))
    assert "".join(pieces) == full.text and len(pieces) > 1
    stop = full.text[5:8]
    [cut] = generator.generate(prompts(1), SamplingParams(max_new_tokens=16, stop=[stop]))
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(generator.stream(prompts(1)[0], SamplingParams(max_new_tokens=16, stop=[stop]))) == cut.text


def test_eos_ends_generation(tiny_llava):
    generator = Generator(tiny_llava)
    [free] = generator.generate(prompts(1), SamplingParams(max_new_tokens=6))
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    generator.stop_ids = {free.token_ids[2]}
    [stopped] = generator.generate(prompts(1), SamplingParams(max_new_tokens=6))
    first = free.token_ids.index(free.token_ids[2])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first]


def test_text_tracker_holds_back_partial_stop_strings(tiny_llava):
    tokenizer = tiny_llava.llm.tokenizer
    tracker = TextTracker(tokenizer, stop=["END"])
    shown = [tracker.push(t) for t in tokenizer("ab EN", add_special_tokens=False)["input_ids"]]
    assert "".join(shown) == "ab "  # "EN" might begin "END"
    shown += [tracker.push(t) for t in tokenizer("D more", add_special_tokens=False)["input_ids"]]
    assert "".join(shown) == "ab " and tracker.stopped
    multibyte = TextTracker(tokenizer, stop=[])
    pieces = [multibyte.push(t) for t in tokenizer("é", add_special_tokens=False)["input_ids"]]
    assert pieces == ["", "é"]  # no half character shown


def test_context_overflow_names_the_counts():
    model = tiny_model()
    generator = Generator(model)
    prompt = {"messages": [{"role": "user", "content": "x" * 300}]}
    with pytest.raises(UserError, match=r"plus max_new_tokens \(300\) exceeds the context of 512"):
        generator.generate([prompt], SamplingParams(max_new_tokens=300))


def test_lora_is_merged_for_generation_and_the_base_weights_come_back_exactly():
    from polymodal.llm import merged_lora

    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "gate_proj"]}
    model = tiny_model(llm={"lora": lora})
    torch.manual_seed(1)
    for name, parameter in model.llm.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters something to add
            parameter.data.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        unmerged = model.llm.model(ids).logits
        with merged_lora(model.llm.model):
            merged = model.llm.model(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    Generator(model).generate([prompt], SamplingParams(max_new_tokens=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prompts_about_one_image_share_its_prefix_and_answer_as_alone(model):
    """Questions about the same image compute system prompt + image once (one prefix per
    image), yet every answer equals the one it gets asked alone."""
    from polymodal.engine.generate import shared_prefixes

    pictures = [image(0), image(1)]
    batch = [{"messages": [{"role": "user", "content": f"<image>{q}"}], "images": [pictures[i % 2]]}
             for i, q in enumerate([*QUESTIONS, "Shape?"])]
    generator = Generator(model)
    shared = shared_prefixes(batch, [generator.encode(p) for p in batch], model.llm.image_token_id)
    assert shared is not None and shared.owner == [0, 1, 0, 1]
    params = SamplingParams(max_new_tokens=10)
    together = generator.generate(batch, params)
    alone = [generator.generate([p], params)[0] for p in batch]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]


def test_shared_prefix_prefill_matches_the_full_prompt_in_both_runners(model):
    torch.manual_seed(0)
    hidden = model.llm.hidden_size
    prefix, suffix = torch.randn(2, 5, hidden), torch.randn(3, 4, hidden)
    prefix_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    suffix_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    owner = torch.tensor([0, 1, 1])
    with torch.no_grad():
        full = HFRunner(model.llm.model).prefill(torch.cat([prefix[owner], suffix], 1),
                                                 torch.cat([prefix_mask[owner], suffix_mask], 1), 12)
        for runner in (LlamaRunner(model.llm.model), HFRunner(model.llm.model)):
            shared = runner.prefill_shared(prefix, prefix_mask, owner, suffix, suffix_mask, 12)
            torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
            runner.step(torch.tensor([3, 4, 5]))  # the cache keeps going after a shared prefill


def test_text_only_prompts_share_the_ids_they_begin_with_and_answer_as_alone(model):
    from polymodal.engine.generate import shared_prefixes

    batch = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    generator = Generator(model)
    samples = [generator.encode(p) for p in batch]
    shared = shared_prefixes(batch, samples, model.llm.image_token_id)
    assert shared is not None and shared.owner == [0, 0, 0]
    prefix = shared.prefixes[0]["input_ids"]
    assert len(prefix) > 1 and all(s["input_ids"][: len(prefix)] == prefix for s in samples)
    params = SamplingParams(max_new_tokens=10)
    together = generator.generate(batch, params)
    alone = [generator.generate([p], params)[0] for p in batch]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]


@pytest.mark.parametrize("runner", [LlamaRunner, HFRunner])
def test_rows_that_finish_leave_the_batch_and_the_rest_answer_unchanged(model, monkeypatch, runner):
    from polymodal.engine import generate

    monkeypatch.setattr(generate, "make_runner", runner)
    kept = []
    keep_rows = runner.keep_rows
    monkeypatch.setattr(runner, "keep_rows", lambda self, rows: kept.append(len(rows)) or keep_rows(self, rows))
    batch, params = prompts(4), SamplingParams(max_new_tokens=8)
    free = Generator(model)
    free.stop_ids = set()
    stop = free.generate(batch, params)[0].token_ids[1]  # the first row ends at its second token
    cached, uncached = Generator(model), Generator(model, use_cache=False)
    cached.stop_ids = uncached.stop_ids = {stop}
    answers = cached.generate(batch, params)
    assert [a.token_ids for a in answers] == [u.token_ids for u in uncached.generate(batch, params)]
    assert answers[0].finish_reason == "stop" and len(answers[0].token_ids) <= 1
    assert kept and kept[0] < 4 and any(len(a.token_ids) > 2 for a in answers)
