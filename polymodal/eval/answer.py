"""Answering a task's items: batched greedy generation, each image decoded and encoded once.

Items are taken in groups by image, so a batch holds all the questions about a few
images; the engine then runs the shared prefix (system prompt + image tokens) once
per image and only each question's own tokens per row (`engine.generate.shared_prefixes`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from tqdm import tqdm

from polymodal.data.sample import Item
from polymodal.engine.generate import Engine, media_key
from polymodal.engine.sampling import SamplingParams


def image_key(item: Item) -> tuple:
    """Items with equal keys show the same images: paths by value, objects by identity."""
    return tuple(media_key(image) for image in item.images)


def answer_items(model, items: list[Item], batch_size: int = 32, max_new_tokens: int = 8,
                 desc: str = "answering", system: str | None = None) -> list[str]:
    """The model's greedy answer to every item, in item order; `system`: a system message
    before each question."""
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    answers: list[str] = [""] * len(items)
    with engine.lora_merged():
        for chunk, prompts in batches(model, items, batch_size, desc):
            if system is not None:
                for prompt in prompts:
                    prompt["messages"].insert(0, {"role": "system", "content": system})
            for index, completion in zip(chunk, engine.generate(prompts, params)):
                answers[index] = completion.text
    return answers


def answer_logits(model, items: list[Item], token_ids: list[int], batch_size: int = 32,
                  desc: str = "scoring") -> torch.Tensor:
    """[len(items), len(token_ids)]: the logit of each given first answer token, per item."""
    engine = Engine(model)
    scores = torch.zeros(len(items), len(token_ids))
    with engine.lora_merged():
        for chunk, prompts in batches(model, items, batch_size, desc):
            scores[chunk] = engine.first_token_logits(prompts)[:, token_ids]
    return scores


def batches(model, items: list[Item], batch_size: int, desc: str) -> Iterator[tuple[list[int], list[dict]]]:
    """(item indices, their prompts) in batches that keep the questions about one image
    together; each image is decoded once and dropped after its last question. Shows a
    progress bar in questions per second."""
    first_seen: dict[tuple, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(image_key(item), index)
    order = sorted(range(len(items)), key=lambda i: first_seen[image_key(items[i])])
    remaining = Counter(image_key(item) for item in items)
    pixels: dict = {}  # image -> [3, S, S]
    with tqdm(total=len(items), desc=desc, unit="q") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, [_prompt(model, items[i], pixels) for i in chunk]
            for index in chunk:
                key = image_key(items[index])
                remaining[key] -= 1
                if remaining[key] == 0:
                    for image in items[index].images:
                        pixels.pop(media_key(image), None)
            progress.update(len(chunk))


def _prompt(model, item: Item, pixels: dict) -> dict:
    """The item's prompt with its images as cached pixel tensors (the same object for every
    question about one image, which is how the engine sees that they share it)."""
    images = []
    for image in item.images:
        key = media_key(image)
        if key not in pixels:
            pixels[key] = model.processor.pixels([image])[0]
        images.append(pixels[key])
    prompt = item.prompt(model.image_placeholder)
    prompt["images"] = images
    return prompt
