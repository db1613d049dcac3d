"""The task registry and what every task shares: items, seeded samples, JSONL task files.

A task turns its data into `Item`s (images + a question + the accepted answers), and
scores the model's answers to them. Answering is the same for every task
(`eval.answer`), so `polymodal analyze` can change the items (blank the image, drop
the question) and score them with the task's own metric.

Example:
    task = get_task("pope")
    items = task.items(TaskOptions(split="test", limit=300))
    results, rows = task.score(items, answer_items(model, items))
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from polymodal.data.formats import image_paths
from polymodal.errors import UserError
from polymodal.processing.processor import with_placeholders
from polymodal.registry import Registry


@dataclass
class Item:
    """One question to the model."""

    id: str
    question: str  # the text after the image placeholders
    images: list  # paths, PIL images or pixel tensors [3, S, S]
    references: list[str]  # accepted answers (captions for `caption`)
    info: dict = field(default_factory=dict)  # kept in predictions.jsonl: type, setting, rotation, ...

    def prompt(self, placeholder: str = "<image>") -> dict:
        """A chat prompt: the question, after one placeholder per image unless it marks them."""
        content = with_placeholders(self.question, len(self.images), placeholder)
        return {"messages": [{"role": "user", "content": content}], "images": list(self.images)}


@dataclass
class TaskOptions:
    split: str = "test"  # easy-VQA split, when the task derives its data from easy-VQA
    data: str | None = None  # a task file (JSONL) or a folder in the easy-VQA layout
    limit: int | None = None  # a fixed, seeded sample
    seed: int = 0
    setting: str = "all"  # pope: random, popular, adversarial or all
    prompt: str | None = None  # caption: the instruction
    templates: list[str] | None = None  # zeroshot: prompt templates with {} for the label
    image_model: str | None = None  # audio-image: the image dual encoder to retrieve with
    system: str | None = None  # a system message before every question
    max_new_tokens: int | None = None  # None: the task's own (8 for short answers)


class Task:
    """Base of every task: a name, its items, its metrics, its pictures."""

    name = ""
    headline = "accuracy"  # the metric `analyze` compares across ablations
    max_new_tokens = 8

    generative = True  # answered by a MultimodalLM; contrastive tasks embed instead

    def items(self, options: TaskOptions) -> list[Item]:
        raise NotImplementedError

    def run(self, model, options: TaskOptions, batch_size: int,
            items: list[Item] | None = None) -> tuple[dict, list[dict]]:
        """(metrics, rows): the model answers every item, and the answers are scored."""
        from polymodal.eval.answer import answer_items

        if hasattr(model, "encode_texts"):
            raise UserError(f"task {self.name} needs a generative model; this one is a dual encoder")
        items = self.items(options) if items is None else items
        if not items:
            raise UserError(f"task {self.name}: the data holds no questions")
        predictions = answer_items(model, items, batch_size, self.new_tokens(options), desc=self.name,
                                   system=options.system)
        return self.score(items, predictions)

    def new_tokens(self, options: TaskOptions) -> int:
        """How many tokens an answer may take: the user's --max-new-tokens, or the task's."""
        return options.max_new_tokens or self.max_new_tokens

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        """Answers -> (results: metrics, rows: one per item for predictions.jsonl)."""
        raise NotImplementedError

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        """Pictures of the results in `out` (none by default)."""

    def without_question(self, item: Item) -> Item:
        """The item with its question removed (the `analyze` ablation)."""
        return replace(item, question="")


TASKS = Registry("task")


def register_task(name: str):
    def decorate(cls):
        cls.name = name
        return TASKS.register(name)(cls)

    return decorate


def get_task(name: str) -> Task:
    """The task by name; an unknown name is an error that lists the tasks."""
    _load_tasks()
    return TASKS.get(name).builder()


def task_names() -> list[str]:
    _load_tasks()
    return TASKS.names()


def _load_tasks() -> None:
    # Importing each task module runs its @register_task.
    import polymodal.eval.audio_image
    import polymodal.eval.caption
    import polymodal.eval.easy_vqa
    import polymodal.eval.multiple_choice
    import polymodal.eval.pope
    import polymodal.eval.retrieval
    import polymodal.eval.vqa
    import polymodal.eval.zeroshot  # noqa: F401


def seeded_sample(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed sample of `limit` items (all of them when limit is None or larger)."""
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-empty line; a malformed line is an error naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not data
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f"{path}:{number}: missing field {missing[0]!r}")
        records.append((number, record))
    if not records:
        raise UserError(f"{path}: no records")
    return records


def record_images(path: Path, number: int, record: dict) -> list[str]:
    """The image paths of a record (`image` or `images`: a path or a list of paths), relative
    to the task file's folder; a missing image is an error naming it."""
    resolved = [str(path.parent / image) for image in image_paths(record, f"{path}:{number}")]
    for image in resolved:
        if not Path(image).exists():
            raise UserError(f"{path}:{number}: image not found: {image}")
        if not Path(image).is_file():  # a folder, FIFO or device
            raise UserError(f"{path}:{number}: not a file: {image}")
    return resolved
