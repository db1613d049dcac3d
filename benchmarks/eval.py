"""Evaluation speed: `polymodal eval`'s answering vs a plain per-question loop over
transformers' `generate`, on the same model, questions, dtype and threads, in one run.

Ours batches the questions, keeps the questions about one image together so the system
prompt and image tokens run once per image (shared prefix), and encodes each image once.
Theirs, per question: load the image, encode it, fuse the prompt embeddings, and call
`generate(inputs_embeds=...)` greedily with the same stop tokens. LoRA is folded into the
weights once for both. The questions are the first N of the easy-VQA test split, in file
order (about ten per image, as a full evaluation sees them). Agreement of the two sides'
answers is printed as a check that both did the same work.

    python benchmarks/eval.py [--model runs/easy-vqa/model] [--questions 640] [--theirs 160] [--batch-sizes 64 128]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from polymodal.build import load_any
from polymodal.engine.generate import Engine
from polymodal.eval.answer import answer_items
from polymodal.eval.easy_vqa import question_items
from polymodal.eval.tasks import TaskOptions


def ours(model, items, batch_size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = answer_items(model, items, batch_size, max_new_tokens=8, desc="polymodal")
    return time.perf_counter() - start, [a.strip() for a in answers]


@torch.inference_mode()
def theirs(model, items) -> tuple[float, list[str]]:
    stop = sorted(Engine(model).stop_ids)
    answers = []
    start = time.perf_counter()
    for item in items:
        encoded = model.processor.encode(item.prompt(model.image_placeholder)["messages"], item.images)  # loads it
        ids = torch.tensor([encoded["input_ids"]])
        embeds = model.embed(ids, encoded["media"])  # encodes it: [1, T, D]
        out = model.llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=8, do_sample=False, eos_token_id=stop,
                                       pad_token_id=model.pad_id)
        answers.append(model.llm.tokenizer.decode(out[0], skip_special_tokens=True).strip())
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "runs/easy-vqa/model" if os.path.isdir("runs/easy-vqa/model") else "recipes/easy-vqa.yaml"
    parser.add_argument("--model", default=default, help="a model directory or recipe (untrained)")
    parser.add_argument("--questions", type=int, default=640, help="questions for polymodal")
    parser.add_argument("--theirs", type=int, default=160, help="questions for the per-question loop")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_any(args.model).eval()
    items = question_items(TaskOptions(split="test"))[: args.questions]
    with Engine(model).lora_merged():  # both sides run the same merged weights
        theirs(model, items[:4])  # warm up
        their_time, their_answers = theirs(model, items[: args.theirs])
        ours_by_batch = {size: ours(model, items, size) for size in args.batch_sizes}
    images = len({item.images[0] for item in items})
    print(f"model {args.model}, {args.threads} threads, float32, easy-VQA test questions in file order "
          f"({len(items)} questions on {images} images)")
    print(f"{'side':<36} {'questions':>9} {'seconds':>8} {'q/s':>7}")
    print(f"{'transformers generate, per question':<36} {args.theirs:>9} {their_time:>8.2f} "
          f"{args.theirs / their_time:>7.2f}")
    for size, (our_time, our_answers) in ours_by_batch.items():
        ratio = (len(items) / our_time) / (args.theirs / their_time)
        same = sum(a == b for a, b in zip(our_answers, their_answers)) / len(their_answers)
        print(f"{f'polymodal eval, batch {size}':<36} {len(items):>9} {our_time:>8.2f} "
              f"{len(items) / our_time:>7.2f}  ratio {ratio:.2f}x, answers agree {same:.1%}")


if __name__ == "__main__":
    main()
