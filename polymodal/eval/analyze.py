"""Modality reliance: does the model use the image, and does it combine image and text?

Ablations answer the same questions with the image blanked to its mean colour, with the
images swapped between questions (every question about one image gets one other image),
and with the question removed; each scored with the task's own headline metric, next to
the full input. EMAP (`eval.emap`) measures what cross-modal interaction adds.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch

from polymodal.engine.generate import media_key
from polymodal.errors import UserError
from polymodal.eval.answer import answer_items, answer_logits, image_key
from polymodal.eval.emap import diagonal_choices, emap_projection
from polymodal.eval.metrics import normalize
from polymodal.eval.plots import plot_grouped_bars
from polymodal.eval.report import write_outputs
from polymodal.eval.tasks import Item, Task, TaskOptions, seeded_sample


def blanked(model, items: list[Item]) -> list[Item]:
    """Each image replaced by a flat image of its mean colour (one object per image)."""
    flat: dict = {}

    def blank(image):
        key = media_key(image)
        if key not in flat:
            pixels = model.processor.pixels([image])[0]  # [3, S, S]
            flat[key] = pixels.mean(dim=(1, 2), keepdim=True).expand_as(pixels).clone()
        return flat[key]

    return [replace(item, images=[blank(image) for image in item.images]) for item in items]


def shuffled(items: list[Item], seed: int = 0) -> list[Item]:
    """Images moved between questions: the distinct image sets in a seeded order, each
    given to the questions of the next one (so none keeps its own)."""
    keys = list(dict.fromkeys(image_key(item) for item in items))
    if len(keys) < 2:
        raise UserError("shuffling images needs questions about at least two images")
    images_of = {image_key(item): item.images for item in items}
    random.Random(seed).shuffle(keys)
    moved = {key: images_of[keys[(index + 1) % len(keys)]] for index, key in enumerate(keys)}
    return [replace(item, images=moved[image_key(item)]) for item in items]


def emap(model, task: Task, items: list[Item], size: int, batch_size: int, seed: int = 0) -> dict | None:
    """Full model vs its additive projection on `size` questions x `size` images (one
    question per image), over the answers the sample's references use; None when the task
    has open answers (captions, lettered options)."""
    by_image = {}
    for item in random.Random(seed).sample(items, len(items)):  # a random question per image
        by_image.setdefault(image_key(item), item)
    sample = seeded_sample(list(by_image.values()), size, seed)
    answers = sorted({normalize(r) for item in sample for r in item.references} - {""})
    if task.name in ("caption", "multiple-choice") or len(sample) < 2 or len(answers) < 2:
        return None
    tokenizer = model.llm.tokenizer
    first_tokens = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    pairs = [replace(question, images=image.images) for question in sample for image in sample]
    logits = answer_logits(model, pairs, first_tokens, batch_size, desc="emap")
    scores = logits.view(len(sample), len(sample), len(answers))  # [question, image, answer]
    full = task.score(sample, [answers[c] for c in diagonal_choices(scores)])[0][task.headline]
    additive = task.score(sample, [answers[c] for c in diagonal_choices(emap_projection(scores))])[0][task.headline]
    return {"n": len(sample), "answers": len(answers), "full": full, "projection": additive,
            "gap": full - additive, "shared_first_tokens": len(first_tokens) - len(set(first_tokens))}


def analyze(model, task: Task, options: TaskOptions, batch_size: int = 32, emap_size: int = 50,
            out: str | Path | None = None, command: str = "") -> dict:
    items = task.items(options)
    if not items:
        raise UserError(f"task {task.name}: the data holds no questions")
    variants = {"full": items, "blank image": blanked(model, items),
                "shuffled images": shuffled(items, options.seed),
                "no question": [task.without_question(item) for item in items]}
    scores, rows = {}, []
    for name, variant in variants.items():
        predictions = answer_items(model, variant, batch_size, task.new_tokens(options), desc=name,
                                   system=options.system)
        metrics, variant_rows = task.score(items, predictions)  # scored against the true answers
        scores[name] = metrics[task.headline]
        rows += [{**row, "ablation": name, "prompt": v.question} for row, v in zip(variant_rows, variant)]
    results = {"task": task.name, "split": options.data or options.split, "n": len(items),
               "metric": task.headline, **dict(scores.items()),
               "drop": {name: scores["full"] - score for name, score in scores.items() if name != "full"}}
    with torch.inference_mode():
        results["emap"] = emap(model, task, items, emap_size, batch_size, options.seed) if emap_size else None
    if out is not None:
        out = Path(out)
        write_outputs(out, f"{task.name}: modality reliance", results, rows, command)
        plot_reliance(results, out / "reliance.png")
    return results


def plot_reliance(results: dict, out: Path) -> None:
    bars = {name: {results["metric"]: results[name]}
            for name in ("full", "blank image", "shuffled images", "no question")}
    if results.get("emap"):
        bars["EMAP sample: full"] = {results["metric"]: results["emap"]["full"]}
        bars["EMAP: additive"] = {results["metric"]: results["emap"]["projection"]}
    plot_grouped_bars(bars, out, f"{results['task']}: what the model uses", results["metric"])
