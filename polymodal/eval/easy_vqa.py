"""`easy-vqa`: exact match after normalising, per question type, with a confusion matrix."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from polymodal.data.formats import easy_vqa_folder, read_easy_vqa_questions
from polymodal.engine.generate import Generator
from polymodal.engine.sampling import SamplingParams
from polymodal.eval.metrics import accuracy_by, confusion, normalize
from polymodal.eval.plots import plot_confusion
from polymodal.model import atomic_write

SHAPES = {"circle", "rectangle", "triangle"}


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def evaluate_easy_vqa(model, split: str | None = "test", folder: str | None = None, limit: int | None = None,
                      batch_size: int = 32, out: Path | None = None, seed: int = 0,
                      rows: list | None = None) -> dict:
    """Answer every question (or a seeded sample of `limit`); returns the headline metrics.
    The per-question rows are appended to `rows` when it is given."""
    questions = read_easy_vqa_questions(easy_vqa_folder(split, folder))
    if limit is not None and limit < len(questions):
        questions = random.Random(seed).sample(questions, limit)
    generator = Generator(model)
    params = SamplingParams(max_new_tokens=8)
    rows, pixels = rows if rows is not None else [], {}  # each image is read and decoded once for all its questions
    for start in tqdm(range(0, len(questions), batch_size), desc="easy-vqa", unit="batch"):
        chunk = questions[start : start + batch_size]
        for _, _, image in chunk:
            if image not in pixels:
                pixels[image] = model.processor.pixels([image])[0]
        prompts = [{"messages": [{"role": "user", "content": f"<image>\n{q}"}], "images": [pixels[image]]}
                   for q, _, image in chunk]
        for (question, answer, image), completion in zip(chunk, generator.generate(prompts, params)):
            prediction = normalize(completion.text)
            rows.append({"image": Path(image).stem, "question": question, "prediction": prediction,
                         "reference": answer, "type": question_type(answer), "correct": prediction == answer})
    results = {"task": "easy-vqa", "split": folder or split, "n": len(rows),
               "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
               "accuracy_by_type": accuracy_by(rows, "type")}
    if out is not None:
        write_outputs(Path(out), results, rows)
    return results


def write_outputs(out: Path, results: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(out / "predictions.jsonl", lambda p: p.write_text(text))
    labels, counts = confusion(rows)
    plot_confusion(labels, counts, out / "confusion.png", f"easy-VQA: accuracy {results['accuracy']:.1%}")
