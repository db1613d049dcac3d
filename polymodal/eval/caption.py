"""`caption`: describe each image; BLEU-4 and CIDEr-D against reference captions, over at
least ten images (CIDEr-D's weights come from the evaluated set; docs/metrics.md).

Task file (JSONL): {"image", "captions": [str]} (or "text": str), image paths relative to
the file's folder; without one, the dataset's images and captions (`task_dataset`; easy-VQA's
are derived from its questions: "a red triangle").
"""

from __future__ import annotations

from pathlib import Path

from polymodal.data.captions import CAPTION_PROMPT
from polymodal.data.errors import DataError
from polymodal.data.records import read_jsonl, record_images
from polymodal.errors import UserError
from polymodal.eval.caption_metrics import MIN_CIDER_IMAGES, caption_scores
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    register_task,
    seeded_sample,
    task_dataset,
    task_file,
)


def read_caption_file(path: str | Path, prompt: str) -> list[Item]:
    path = Path(path)
    items = []
    for number, record in read_jsonl(path, ("image",)):
        captions = record.get("captions", [record["text"]] if "text" in record else None)
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError("expected 'captions' (a list of strings) or 'text'", path, line=number)
        items.append(Item(str(record.get("id", number)), prompt, record_images(path, number, record), captions))
    return items


def caption_items(options: TaskOptions, prompt: str) -> list[Item]:
    """The task file's images and captions, or the dataset's; all of them (not sampled)."""
    path = task_file(options)
    if path is not None:
        return read_caption_file(path, prompt)
    return [Item(Path(image).stem, prompt, [image], [caption])
            for image, caption in task_dataset(options).caption_pairs()]


def check_image_count(count: int) -> None:
    """Raises UserError under MIN_CIDER_IMAGES images: CIDEr-D's n-gram weights come from
    the evaluated images themselves, so one image scores 0 even for an exact match."""
    if count < MIN_CIDER_IMAGES:
        raise UserError(f"task caption: CIDEr-D needs at least {MIN_CIDER_IMAGES} images (it weighs "
                        f"words by their rarity among the evaluated images); got {count}: raise --limit "
                        "or add images")


@register_task("caption")
class Caption(Task):
    """Image captioning: corpus BLEU-4 and CIDEr-D (pycocoevalcap), 10 images or more.

    CIDEr-D's IDF comes from the evaluated set, so fewer than MIN_CIDER_IMAGES are refused."""

    headline = "cider_d"
    max_new_tokens = 32

    def items(self, options: TaskOptions) -> list[Item]:
        items = seeded_sample(caption_items(options, options.prompt or CAPTION_PROMPT), options.limit,
                              options.seed)
        check_image_count(len(items))
        return items

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        check_image_count(len(items))
        scores = caption_scores([p.strip() for p in predictions], [item.references for item in items])
        rows = [prediction_row(item, text.strip(), cider, item.references)
                for item, text, cider in zip(items, predictions, scores["per_item"])]
        return {"bleu4": scores["bleu4"], "cider_d": scores["cider_d"]}, rows
