"""easy-VQA accuracy of a `--format smolvlm` export, run by plain transformers alone.

What a user of the export does: `AutoProcessor` (its chat template, its image processor,
the image token expansion) and `AutoModelForImageTextToText.generate`, greedy, with
`trust_remote_code` off. This script never imports polymodal (checked at the end), so the
figure is the export's, not polymodal's. Scoring follows the `easy-vqa` eval task: the
answer lower-cased, whitespace collapsed, surrounding punctuation dropped, compared with the
reference; accuracy overall and by question type (shape, colour, yes/no). The questions are
easy-VQA's test split from the `easy_vqa` package in file order, each asked as
"<image>\\n" + question (the layout `polymodal eval` asks it in).

    python benchmarks/smolvlm_plain_eval.py EXPORT [--limit N] [--batch-size 64] [--out FILE.json]
        [--compare RUN/eval/predictions.jsonl]

`--out` writes the figures and every prediction; `--compare` reads polymodal's
predictions.jsonl (`polymodal eval MODEL --task easy-vqa --out DIR`), asks exactly its
questions (unless `--limit` is given) and reports how many answers agree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")


def normalize(text: str) -> str:
    """As polymodal.eval.metrics.normalize (which this script must not import)."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:\"'")


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "colour"


def test_questions(limit: int | None) -> list[dict]:
    """easy-VQA's test questions in file order: {id, question, answer, image}; `id` is
    polymodal's item id ("{image id}:{question number}")."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    items = [{"id": f"{image}:{number}", "question": question, "answer": answer, "image": paths[image]}
             for number, (question, answer, image) in enumerate(zip(questions, answers, image_ids))]
    return items[:limit] if limit else items


def answer_all(directory: str, items: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers through the export's processor and model, `batch_size` questions per
    `generate` (left padding), the answer decoded without special tokens."""
    import torch
    from PIL import Image
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # The PIL backend: the one this machine has (no torchvision) and the one whose bicubic
    # resize is polymodal's; with torchvision installed it would be chosen by default.
    processor = AutoProcessor.from_pretrained(directory, backend="pil", trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=False).eval()
    answers = []
    images: dict[str, Image.Image] = {}
    with torch.inference_mode(), tqdm(total=len(items), desc="plain transformers", unit="q") as progress:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [processor.apply_chat_template(
                [{"role": "user", "content": "<image>\n" + item["question"]}], add_generation_prompt=True)
                for item in batch]
            pictures = [[images.setdefault(item["image"], Image.open(item["image"]).convert("RGB"))]
                        for item in batch]
            inputs = processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += processor.batch_decode(new, skip_special_tokens=True)
            progress.update(len(batch))
    return answers


def score(items: list[dict], answers: list[str]) -> tuple[dict, list[dict]]:
    rows = [{"id": item["id"], "prompt": item["question"], "prediction": answer.strip(),
             "reference": item["answer"], "correct": normalize(answer) == item["answer"],
             "type": question_type(item["answer"])} for item, answer in zip(items, answers)]
    totals, right = Counter(row["type"] for row in rows), Counter(row["type"] for row in rows if row["correct"])
    results = {"n": len(rows), "accuracy": sum(row["correct"] for row in rows) / max(1, len(rows)),
               "accuracy_by_type": {kind: right[kind] / totals[kind] for kind in sorted(totals)}}
    return results, rows


def agreement(rows: list[dict], path: str) -> dict:
    """How many of our predictions equal polymodal's (normalised) for the same question ids."""
    theirs = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            theirs[row["id"]] = row
    shared = [row for row in rows if row["id"] in theirs]
    same = sum(normalize(row["prediction"]) == normalize(theirs[row["id"]]["prediction"]) for row in shared)
    accuracy = sum(bool(theirs[row["id"]]["correct"]) for row in shared) / max(1, len(shared))
    return {"compared": len(shared), "same_answer": same, "polymodal_accuracy_on_these": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a directory written by `polymodal export --format smolvlm`")
    parser.add_argument("--limit", type=int, default=None, help="the first N test questions (default all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="as the easy-vqa task")
    parser.add_argument("--out", help="write figures and predictions to this JSON file")
    parser.add_argument("--compare", help="polymodal's predictions.jsonl for the same questions")
    args = parser.parse_args()
    items = test_questions(args.limit)
    if args.compare and not args.limit:  # exactly the questions polymodal answered (a --limit sample)
        asked = {json.loads(line)["id"] for line in Path(args.compare).read_text().splitlines() if line.strip()}
        items = [item for item in items if item["id"] in asked]
    start = time.perf_counter()
    answers = answer_all(args.export, items, args.batch_size, args.max_new_tokens)
    results, rows = score(items, answers)
    results["seconds"] = round(time.perf_counter() - start, 1)
    if args.compare:
        results["agreement"] = agreement(rows, args.compare)
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "predictions": rows}, indent=1))
    assert "polymodal" not in sys.modules, "the plain-transformers evaluation imported polymodal"


if __name__ == "__main__":
    main()
