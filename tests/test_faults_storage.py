"""Faults of stored files (issue 21, section 8) and of the slot cache's memory (section 6):
locks on shared outputs, indexes written as a set, damaged model directories, the KV cache
allocated by need."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from polymodal.errors import UserError
from polymodal.locks import exclusive


def test_a_held_lock_refuses_a_second_holder_naming_the_holder(tmp_path):
    lock = tmp_path / "thing.lock"
    with exclusive(lock, "the thing"):
        with pytest.raises(UserError) as error, exclusive(lock, "the thing"):
            pass
        message = str(error.value)
        assert "the thing" in message and str(lock) in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    with exclusive(lock, "the thing"):  # released on exit: taken again
        pass


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    lock = tmp_path / "thing.lock"
    code = ("import sys, time; from pathlib import Path; from polymodal.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"), exclusive(lock, "x"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "x"):  # a killed holder leaves no stale lock
        pass


# --- Item 1: the slot cache takes memory by need -------------------------------------------


def _llm():
    import torch

    from conftest import tiny_model

    model = tiny_model(llm={"source": "tiny:llama"})
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: logits that differ by prompt and by step
        for parameter in model.llm.model.parameters():
            parameter.normal_(0, 0.3)
    return model.llm.model


def _cache_elements(cache) -> int:
    return sum(tensor.numel() for tensor in [*cache.keys, *cache.values])


def test_a_fresh_slot_cache_holds_a_small_length_and_grows_with_the_same_logits():
    import torch

    from polymodal.engine.runners import LlamaRunner
    from polymodal.engine.slots import SlotCache

    llm = _llm()
    cache = SlotCache(llm, max_batch=4, max_length=512, initial_length=4)
    layers, runner = len(cache.keys), cache.runner
    per_slot = runner.kv_heads * runner.head_dim
    full = 2 * layers * 4 * 512 * per_slot
    assert _cache_elements(cache) == 2 * layers * 1 * 4 * per_slot < full // 100
    embed = llm.get_input_embeddings()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, embed.num_embeddings, (1, size), generator=generator) for size in (3, 9, 40)]
    alone, rows, logits = [], [], []
    with torch.inference_mode():
        for prompt in prompts:  # each admitted while the earlier ones decode
            reference = LlamaRunner(llm)
            expect = reference.prefill(embed(prompt), torch.ones_like(prompt), 64)
            got = cache.admit(embed(prompt))
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
            alone.append(reference)
            rows.append(got[0].argmax())
            for _ in range(5):
                logits = cache.step(torch.stack(rows))
                for index, reference in enumerate(alone):
                    expect = reference.step(rows[index][None])[0]
                    torch.testing.assert_close(logits[index], expect, rtol=1e-5, atol=1e-5)
                rows = list(logits.argmax(-1))
    rows_now, length_now = cache.capacity
    assert rows_now >= 3 and 40 + 15 <= length_now < 512  # grown by need, not to the maximum
    for row in reversed(range(3)):
        cache.release(row)
    assert _cache_elements(cache) == 2 * layers * 1 * 4 * per_slot  # idle again: memory given back
