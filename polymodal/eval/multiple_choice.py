"""`multiple-choice`, MMBench-style: every question is asked once per rotation of its
options (A B C -> B C A -> C A B) and counts only if every rotation is answered right
(CircularEval), which removes the gain of always answering "A".

Task file (JSONL): {"image", "question", "options": [str] or {"A": str, ...}, "answer": a
letter, an option's text or its index}; without one, shape and colour questions about
easy-VQA's images.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace
from pathlib import Path

from polymodal.data.formats import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    easy_vqa_image_attributes,
)
from polymodal.errors import UserError
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    read_jsonl,
    record_images,
    register_task,
    seeded_sample,
)

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
Question = tuple[str, list[str], str, list[str]]  # id, images, question, options (the right one first)


def read_choice_file(path: str | Path) -> list[Question]:
    path = Path(path)
    questions = []
    for number, record in read_jsonl(path, ("question", "options", "answer")):
        options, answer = record["options"], record["answer"]
        if isinstance(options, dict):
            options = [options[key] for key in sorted(options)]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{path}:{number}: 'options' must list at least two strings")
        right = _answer_index(answer, options)
        if right is None:
            raise UserError(f"{path}:{number}: answer {answer!r} is not one of the options")
        ordered = [options[right]] + [o for i, o in enumerate(options) if i != right]
        questions.append((str(record.get("id", number)), record_images(path, number, record),
                          str(record["question"]), ordered))
    return questions


def _answer_index(answer, options: list[str]) -> int | None:
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        return LETTERS.index(answer.upper())
    return options.index(answer) if answer in options else None


def easy_vqa_choices(split: str | None, folder: str | None, seed: int) -> list[Question]:
    rng = random.Random(seed)
    questions = []
    for image, found in easy_vqa_image_attributes(split, folder):
        stem = Path(image).stem
        if "shape" in found:
            others = [s for s in EASY_VQA_SHAPES if s != found["shape"]]
            questions.append((f"{stem}:shape", [image], "Which shape is in the image?", [found["shape"], *others]))
        if "color" in found:
            others = rng.sample([c for c in EASY_VQA_COLORS if c != found["color"]], 3)
            questions.append((f"{stem}:color", [image], "What color is the shape?", [found["color"], *others]))
    return questions


def rotations(question: Question, seed: int) -> list[Item]:
    """One item per circular shift of the (once shuffled) options."""
    qid, images, text, options = question
    order = list(range(len(options)))
    random.Random(f"{seed}:{qid}").shuffle(order)
    items = []
    for shift in range(len(options)):
        rotated = order[shift:] + order[:shift]
        lines = [f"{LETTERS[i]}. {options[k]}" for i, k in enumerate(rotated)]
        right = LETTERS[rotated.index(0)]
        prompt = "\n".join([text, *lines, INSTRUCTION])
        items.append(Item(f"{qid}#{shift}", prompt, images, [right],
                          {"question_id": qid, "rotation": shift,
                           "options": [options[k] for k in rotated]}))
    return items


def chosen_letter(answer: str, options: list[str]) -> str | None:
    """"B", "(B)", "B. red" or the text of option B -> "B"; None when no option is chosen."""
    answer = answer.strip()
    match = re.match(r"^\(?([A-Z])(?:[).:]|\s|$)", answer)
    if match and match.group(1) in LETTERS[: len(options)]:
        return match.group(1)
    text = answer.lower().rstrip(".")
    for index, option in enumerate(options):
        if option.lower() == text:
            return LETTERS[index]
    return None


@register_task("multiple-choice")
class MultipleChoice(Task):
    """MMBench-style multiple choice with CircularEval over option rotations."""

    headline = "circular_accuracy"

    def items(self, options: TaskOptions) -> list[Item]:
        if options.data and Path(options.data).is_file():
            questions = read_choice_file(options.data)
        else:
            questions = easy_vqa_choices(options.split, options.data, options.seed)
        questions = seeded_sample(questions, options.limit, options.seed)
        return [item for question in questions for item in rotations(question, options.seed)]

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        rows = []
        for item, text in zip(items, predictions):
            letter = chosen_letter(text, item.info["options"])
            rows.append(prediction_row(item, text.strip(), letter == item.references[0]))
        by_question: dict[str, bool] = {}
        for row in rows:
            by_question[row["question_id"]] = by_question.get(row["question_id"], True) and row["correct"]
        first = [row["correct"] for row in rows if row["rotation"] == 0]
        results = {"circular_accuracy": sum(by_question.values()) / max(1, len(by_question)),
                   "single_pass_accuracy": sum(first) / max(1, len(first)), "questions": len(by_question)}
        return results, rows

    def without_question(self, item: Item) -> Item:
        """The options and instruction stay; the question line goes."""
        return replace(item, question=item.question.split("\n", 1)[1])
