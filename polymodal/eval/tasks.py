"""What every task shares: options, the Task base, seeded samples, where a task's data
comes from. Tasks register in `registry.EVAL_TASKS` (with `register_task`); this package's
`__init__` imports every task module, so discovery finds them all.

A task turns its data into `Item`s (images + a question + the accepted answers), and
scores the model's answers to them. Answering is the same for every task
(`eval.answer`), so `polymodal analyze` can change the items (blank the image, drop
the question) and score them with the task's own metric. A task's data is a task file
(`--data FILE.jsonl`) or, without one, what a dataset lends it (`task_dataset`).

Example:
    task = get_task("pope")
    items = task.items(TaskOptions(split="test", limit=300))
    results, rows = task.score(items, answer_items(model, items))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from polymodal.data.errors import DataError
from polymodal.data.evaluation import EvaluationData
from polymodal.data.sample import Item
from polymodal.engine.images import MAX_IMAGES_PER_PROMPT
from polymodal.errors import UserError
from polymodal.registry import DATASET_FORMATS, EVAL_TASKS

__all__ = ["Item", "Task", "TaskOptions", "get_task", "named_dataset", "register_task", "seeded_sample",
           "task_dataset", "task_file", "task_names"]


@dataclass
class TaskOptions:
    split: str = "test"  # the split of `dataset` a task reads when no task file is given
    data: str | None = None  # a task file (JSONL), or a folder in the layout of `dataset`
    # The dataset format (registry.DATASET_FORMATS; its options an EvaluationData) whose
    # questions, captions or objects a task uses without a task file: the built-in one.
    dataset: str = "easy-vqa"
    limit: int | None = None  # a fixed, seeded sample
    seed: int = 0
    setting: str = "all"  # pope: random, popular, adversarial or all
    prompt: str | None = None  # caption: the instruction
    templates: list[str] | None = None  # zeroshot: prompt templates with {} for the label
    image_model: str | None = None  # audio-image: the image dual encoder to retrieve with
    system: str | None = None  # a system message before every question
    max_new_tokens: int | None = None  # None: the task's own (8 for short answers)
    shots: int = 0  # solved examples before each question (eval.shots; Task.with_shots)
    # text-to-image: images drawn per prompt and how they are sampled (engine.SamplingParams)
    images_per_prompt: int = 8
    guidance_scale: float = 1.0  # classifier-free guidance (1: none)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter

    def __post_init__(self):
        """Raises UserError for images_per_prompt outside [1, MAX_IMAGES_PER_PROMPT]: the one
        check, made when the command line's options are read, before any model loads."""
        if not 1 <= self.images_per_prompt <= MAX_IMAGES_PER_PROMPT:
            raise UserError(f"--images-per-prompt must be in [1, {MAX_IMAGES_PER_PROMPT}]")


class Task:
    """Base of every task: a name, its items, its metrics, its pictures."""

    name = ""
    headline = "accuracy"  # the metric `analyze` compares across ablations
    max_new_tokens = 8

    generative = True  # answered by a MultimodalLM; contrastive tasks embed instead
    draws = False  # takes eval's drawing options (--images-per-prompt, --cfg, --temperature, --top-k)

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
        asked = self.with_shots(model, items, options) if options.shots else items
        predictions = answer_items(model, asked, batch_size, self.new_tokens(options), desc=self.name,
                                   system=options.system)
        metrics, rows = self.score(items, predictions)  # scored as the questions alone
        if options.shots:
            for row, item in zip(rows, asked):
                row["examples"] = [example.id for example in item.examples]
        return {**metrics, "shots": options.shots}, rows

    def with_shots(self, model, items: list[Item], options: TaskOptions) -> list[Item]:
        """The items as few-shot prompts: `options.shots` solved examples before each, drawn
        from this task's other items (eval.shots says which). Raises UserError when too few."""
        from polymodal.eval.shots import few_shot_items

        pool = self.items(replace(options, limit=None, shots=0))
        return few_shot_items(items, pool, options.shots, options.seed, model.processor.placeholders)

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


def register_task(name: str):
    """Class decorator: the Task subclass becomes task `name` (registry.EVAL_TASKS)."""
    def decorate(cls):
        cls.name = name
        return EVAL_TASKS.register(name)(cls)

    return decorate


def get_task(name: str) -> Task:
    """The task by name; an unknown name is a UserError that lists the tasks."""
    return EVAL_TASKS.get(name).builder()


def task_names() -> list[str]:
    return EVAL_TASKS.names()


def task_file(options: TaskOptions) -> Path | None:
    """The task file `--data` names, or None when it names none (or a dataset's folder, or a
    set by name: `aeon:NAME`). Raises DataError when `--data` names nothing that exists."""
    if not options.data or named_dataset(options.data):
        return None
    path = Path(options.data)
    if not path.exists():
        raise DataError(f"not found (--data: a task file, or a folder in the layout of {options.dataset})", path)
    return path if path.is_file() else None


def task_dataset(options: TaskOptions) -> EvaluationData:
    """The dataset a task reads without a task file: `options.dataset` at `options.split`, or
    at the folder (or dataset file) `--data` names, or the set `--data FORMAT:NAME` names
    (`aeon:BasicMotions`: the format, then the name it is given as its source). Raises
    UserError for a format that lends no questions."""
    named = named_dataset(options.data)
    dataset, source = named if named else (options.dataset, options.data)
    if not named:
        check_data_folder(options)
    entry = DATASET_FORMATS.get(dataset)
    if entry.config is None or not issubclass(entry.config, EvaluationData):
        raise UserError(f"dataset format {dataset} lends no questions to evaluation tasks; "
                        f"give a task file (--data FILE.jsonl)")
    return entry.config.for_evaluation(options.split, source)


def named_dataset(data: str | None) -> tuple[str, str] | None:
    """(format, name) when `--data` is `FORMAT:NAME` for a registered dataset format (and not
    a path that exists): `aeon:BasicMotions`; None otherwise."""
    if not data or ":" not in data or Path(data).exists():
        return None
    dataset, _, name = data.partition(":")
    return (dataset, name) if dataset in DATASET_FORMATS else None


def check_data_folder(options: TaskOptions, layout: str | None = None) -> None:
    """Raises DataError naming `--data` when it names nothing (before a file inside it is
    looked for); `layout`: the dataset whose folder layout it must have (`options.dataset`)."""
    if options.data and not Path(options.data).exists():
        raise DataError(f"not found (--data: a folder in the layout of {layout or options.dataset})", options.data)


def seeded_sample(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed sample of `limit` items (all of them when limit is None or larger)."""
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)
