"""The generation path: KV cache parity, batching parity, runners, sampling, stop strings, streaming."""

import pytest
import torch

from conftest import image, tiny_model
from polymodal.engine.generate import Engine
from polymodal.engine.runners import LlamaRunner, TransformersRunner
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
    cached = Engine(model).generate(prompts(), params)
    uncached = Engine(model, use_cache=False).generate(prompts(), params)
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]
    assert all(len(c.token_ids) > 0 for c in cached)
    assert len({tuple(c.token_ids) for c in cached}) > 1  # the answers differ: a real comparison


def test_batched_generation_equals_one_by_one(model):
    params = SamplingParams(max_new_tokens=12)
    generator = Engine(model)
    batched = generator.generate(prompts(), params)
    single = [generator.generate([p], params)[0] for p in prompts()]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert len({len(generator.encode(p)["input_ids"]) for p in prompts()}) > 1  # padding happened


def test_llama_runner_matches_transformers_forward(model):
    generator = Engine(model)
    batch_prompts = prompts()
    from polymodal.processing import collate
    batch = collate([generator.encode(p) for p in batch_prompts], model.pad_id, left_pad=True)
    embeds = model.embed(batch.input_ids, batch.media)
    with torch.no_grad():
        ours, theirs = LlamaRunner(model.llm.model), TransformersRunner(model.llm.model)
        length = embeds.shape[1] + 3
        torch.testing.assert_close(ours.prefill(embeds, batch.attention_mask, length),
                                   theirs.prefill(embeds, batch.attention_mask, length), rtol=1e-4, atol=1e-4)
        token = torch.tensor([5, 6, 7])
        for _ in range(3):
            torch.testing.assert_close(ours.step(token), theirs.step(token), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_llava):
    generator = Engine(tiny_llava)
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
    generator = Engine(tiny_llava)
    params = SamplingParams(max_new_tokens=16)
    [full] = generator.generate(prompts(1), params)
    pieces = list(generator.stream(prompts(1)[0], params))
    assert "".join(pieces) == full.text and len(pieces) > 1
    stop = full.text[5:8]
    [cut] = generator.generate(prompts(1), SamplingParams(max_new_tokens=16, stop=[stop]))
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(generator.stream(prompts(1)[0], SamplingParams(max_new_tokens=16, stop=[stop]))) == cut.text


def test_eos_ends_generation(tiny_llava):
    generator = Engine(tiny_llava)
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
    generator = Engine(model)
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
    Engine(model).generate([prompt], SamplingParams(max_new_tokens=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prompts_about_one_image_share_its_prefix_and_answer_as_alone(model):
    """Questions about the same image compute system prompt + image once (one prefix per
    image), yet every answer equals the one it gets asked alone."""
    from polymodal.engine.generate import shared_prefixes

    pictures = [image(0), image(1)]
    batch = [{"messages": [{"role": "user", "content": f"<image>{q}"}], "images": [pictures[i % 2]]}
             for i, q in enumerate([*QUESTIONS, "Shape?"])]
    generator = Engine(model)
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
        full = TransformersRunner(model.llm.model).prefill(torch.cat([prefix[owner], suffix], 1),
                                                 torch.cat([prefix_mask[owner], suffix_mask], 1), 12)
        for runner in (LlamaRunner(model.llm.model), TransformersRunner(model.llm.model)):
            shared = runner.prefill_shared(prefix, prefix_mask, owner, suffix, suffix_mask, 12)
            torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
            runner.step(torch.tensor([3, 4, 5]))  # the cache keeps going after a shared prefill


def test_text_only_prompts_share_the_ids_they_begin_with_and_answer_as_alone(model):
    from polymodal.engine.generate import shared_prefixes

    batch = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    generator = Engine(model)
    samples = [generator.encode(p) for p in batch]
    shared = shared_prefixes(batch, samples, model.llm.image_token_id)
    assert shared is not None and shared.owner == [0, 0, 0]
    prefix = shared.prefixes[0]["input_ids"]
    assert len(prefix) > 1 and all(s["input_ids"][: len(prefix)] == prefix for s in samples)
    params = SamplingParams(max_new_tokens=10)
    together = generator.generate(batch, params)
    alone = [generator.generate([p], params)[0] for p in batch]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]


@pytest.mark.parametrize("runner", [LlamaRunner, TransformersRunner])
def test_rows_that_finish_leave_the_batch_and_the_rest_answer_unchanged(model, monkeypatch, runner):
    from polymodal.engine import generate

    monkeypatch.setattr(generate, "make_runner", runner)
    kept = []
    keep_rows = runner.keep_rows
    monkeypatch.setattr(runner, "keep_rows", lambda self, rows: kept.append(len(rows)) or keep_rows(self, rows))
    batch, params = prompts(4), SamplingParams(max_new_tokens=8)
    free = Engine(model)
    free.stop_ids = set()
    stop = free.generate(batch, params)[0].token_ids[1]  # the first row ends at its second token
    cached, uncached = Engine(model), Engine(model, use_cache=False)
    cached.stop_ids = uncached.stop_ids = {stop}
    answers = cached.generate(batch, params)
    assert [a.token_ids for a in answers] == [u.token_ids for u in uncached.generate(batch, params)]
    assert answers[0].finish_reason == "stop" and len(answers[0].token_ids) <= 1
    assert kept and kept[0] < 4 and any(len(a.token_ids) > 2 for a in answers)


# --- one engine: the registry of runners, one KV cache, one decoder-layer step ---------------


def test_runners_are_registered_and_the_fastest_that_supports_the_model_is_picked(model):
    from polymodal.engine.runners import make_runner
    from polymodal.registry import RUNNERS

    assert {"llama", "transformers"} <= set(RUNNERS.names())
    assert type(make_runner(model.llm.model)) is LlamaRunner
    assert type(make_runner(model.llm.model, "transformers")) is TransformersRunner
    config = model.llm.model.config
    sliding = (config.use_sliding_window, config.sliding_window) if hasattr(config, "use_sliding_window") else None
    try:  # a sliding window is not the Llama step's full attention: the generic runner takes it
        config.use_sliding_window, config.sliding_window = True, 4
        assert type(make_runner(model.llm.model)) is TransformersRunner
        with pytest.raises(UserError, match="'llama' runner does not support"):
            make_runner(model.llm.model, "llama")
    finally:
        if sliding is None:
            del config.use_sliding_window, config.sliding_window
        else:
            config.use_sliding_window, config.sliding_window = sliding
    with pytest.raises(UserError, match=r"unknown runner 'fast'; known: .*llama"):
        make_runner(model.llm.model, "fast")


def test_the_generic_runner_passes_the_current_cache_argument(model, recwarn):
    runner = TransformersRunner(model.llm.model)
    with torch.no_grad():
        runner.prefill(torch.randn(2, 4, model.llm.hidden_size), torch.ones(2, 4, dtype=torch.long), 6)
        runner.step(torch.tensor([3, 4]))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
    assert runner.cache.get_seq_length() == 5


def test_the_kv_cache_layout_writes_reads_masks_and_grows():
    from polymodal.engine.kv_cache import KVCache

    cache = KVCache.empty(layers=2, rows=3, kv_heads=2, slots=5, head_dim=4, like=torch.zeros(1))
    assert cache.capacity == (3, 5) and cache.keys[0].shape == (3, 2, 5, 4) and cache.elements() == 2 * 2 * 3 * 2 * 5 * 4
    keys, values = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    cache.write(1, torch.tensor([0, 2]), torch.tensor([1, 3]), keys, values)  # token i -> (row, slot)
    assert torch.equal(cache.keys[1][2, :, 3], keys[1]) and torch.equal(cache.values[1][0, :, 1], values[0])
    read_keys, _ = cache.read(1, slice(2, 3), 4)
    assert read_keys.shape == (1, 2, 4, 4) and torch.equal(read_keys[0, :, 3], keys[1])
    cache.key_mask[:, :3] = torch.tensor([[False, True, True], [True, True, True], [True, True, True]])
    mask = cache.attention_mask(slice(0, 3), torch.arange(3)[None], 3)  # [B, 1, T, S]
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]  # padding sees itself
    assert mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]  # causal
    assert cache.attention_mask(slice(1, 3), torch.tensor([[2], [2]]), 3) is None  # decoding, nothing masked
    grown = cache.grown(4, 8, keep_rows=2, keep_slots=2)
    assert grown.capacity == (4, 8) and torch.equal(grown.values[1][0, :, 1], values[0])
    assert not grown.values[1][2].any() and cache.capacity == (3, 5)  # the old one unchanged
    cache.select_rows(torch.tensor([2, 2]))
    assert torch.equal(cache.keys[1][1, :, 3], keys[1]) and cache.capacity == (2, 5)


def test_the_batch_runner_and_the_slots_run_one_decoder_layer_step_with_the_same_logits(model, monkeypatch):
    """A left-padded batch in the runner and the same prompts admitted one by one into slots
    (different lengths, decoding side by side) give the same logits, through one step function."""
    from polymodal.engine import decoder
    from polymodal.engine.decoder import LlamaDecoder
    from polymodal.engine.decoder_kernel import decoder_step
    from polymodal.engine.slots import SlotCache

    calls, one_call = [], []
    step, run = decoder.decoder_layer_step, decoder.run_step
    monkeypatch.setattr(decoder, "decoder_layer_step", lambda *args: calls.append(args[2]) or step(*args))
    monkeypatch.setattr(decoder, "run_step", lambda *args: one_call.append(args[3]) or run(*args))
    llm, embed = model.llm.model, model.llm.model.get_input_embeddings()
    lengths = [7, 3, 5]
    prompts = [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    padded = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(7) >= 7 - len(p) for p in prompts]).long()
    with torch.no_grad():
        runner, slots = LlamaRunner(llm), SlotCache(llm, max_batch=3, max_length=64, initial_length=4)
        batched = runner.prefill(embed(padded), mask, 12)
        admitted = torch.cat([slots.admit(embed(p)[None]) for p in prompts])
        torch.testing.assert_close(admitted, batched, rtol=1e-4, atol=1e-4)
        tokens = batched.argmax(-1)
        for _ in range(4):
            batched = runner.step(tokens)
            torch.testing.assert_close(slots.step(tokens), batched, rtol=1e-4, atol=1e-4)
            tokens = batched.argmax(-1)
    layers = len(llm.model.layers)
    # runner prefill, 3 admits, then 4 steps each, all layers in one C call where the kernels run
    with torch.no_grad():
        covered = decoder_step(LlamaDecoder(llm)) is not None  # an AVX-512 VNNI or AVX2 CPU and the model's shapes
    assert len(one_call) == (4 + 4 if covered else 0)
    assert len(calls) + layers * len(one_call) == layers * (1 + 3 + 4 + 4)
    assert set(calls) == set(range(layers))


def test_a_context_overflow_is_one_typed_error_with_its_counts():
    from polymodal.engine.batching import BatchingEngine
    from polymodal.errors import ContextLengthError

    model = tiny_model()
    prompt = {"messages": [{"role": "user", "content": "x" * 300}]}
    with pytest.raises(ContextLengthError) as raised:
        Engine(model).generate([prompt], SamplingParams(max_new_tokens=300))
    error = raised.value
    assert (error.new_tokens, error.context) == (300, 512) and 212 < error.prompt_tokens <= 512
    assert isinstance(error, UserError)  # the CLI prints it and exits 2
    engine = BatchingEngine(model, max_length=100)  # not started: submitting only checks and queues
    with pytest.raises(ContextLengthError) as raised:
        engine.submit(prompt, SamplingParams(max_new_tokens=1))
    assert (raised.value.prompt_tokens, raised.value.new_tokens, raised.value.context) == (error.prompt_tokens, 1, 100)
    with pytest.raises(ContextLengthError, match="leaves no room for an answer in the context of 512") as raised:
        Engine(model).encode({"messages": [{"role": "user", "content": "x " * 600}]})  # longer than the context itself
    assert raised.value.prompt_tokens > 512


def test_the_generating_class_is_engine_and_torch_generator_is_left_alone():
    import polymodal

    assert polymodal.Engine is Engine and "Generator" not in polymodal.__all__


@pytest.mark.parametrize("temperature", [1e-300, 1e-46, 1e-30])
def test_a_temperature_too_small_for_float32_picks_the_top_token(temperature):
    # 1e-300 and 1e-46 are 0 in float32: dividing by them gave 0 / 0 = NaN and multinomial failed.
    logits = torch.tensor([[0.1, 2.0, 1.9, -3.0], [5.0, 0.0, 4.99, 1.0]])
    params = SamplingParams(temperature=temperature)
    chosen = choose_next(logits, params, torch.Generator().manual_seed(0))
    assert chosen.tolist() == [1, 0]
