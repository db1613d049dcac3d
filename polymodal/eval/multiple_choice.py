"""`multiple-choice`, MMBench-style: every question is asked once per rotation of its
options (A B C -> B C A -> C A B) and counts only if every rotation is answered right
(CircularEval), which removes the gain of always answering "A".

Task file (JSONL): {"image", "question", "options": [str] or {"A": str, ...}, "answer": a
letter, an option's text or its index}; without one, the dataset's questions
(`task_dataset`; for easy-VQA, the shape and the colour of each image).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace
from pathlib import Path

from polymodal.data.errors import DataError
from polymodal.data.evaluation import Choice
from polymodal.data.records import read_jsonl, record_images
from polymodal.errors import UserError
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

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
Question = Choice  # id, images, question, options (the right one first)


def read_choice_file(path: str | Path) -> list[Question]:
    path = Path(path)
    questions = []
    first_line: dict[str, int] = {}  # id -> the line that used it
    for number, record in read_jsonl(path, ("question", "options", "answer")):
        qid = str(record.get("id", number))
        if qid in first_line:  # CircularEval would merge the two into one question
            raise DataError(f"duplicate id {qid!r} (first on line {first_line[qid]}); "
                            "every question needs its own id", path, line=number)
        first_line[qid] = number
        options, answer = record["options"], record["answer"]
        if isinstance(options, dict):
            options = [options[key] for key in sorted(options)]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise DataError("'options' must list at least two strings", path, line=number)
        right = _answer_index(answer, options)
        if right is None:
            raise DataError(f"answer {answer!r} is not one of the options", path, line=number)
        ordered = [options[right]] + [o for i, o in enumerate(options) if i != right]
        questions.append((qid, record_images(path, number, record),
                          str(record["question"]), ordered))
    return questions


def _answer_index(answer, options: list[str]) -> int | None:
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        return LETTERS.index(answer.upper())
    return options.index(answer) if answer in options else None


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


# Markdown emphasis and code marks models wrap their answers in ("**B**", "`B`").
MARKUP = re.compile(r"[*_`#]")
# A letter named by a cue ("Answer: b", "the answer is (c).", "Option d"), in either case,
# when nothing but punctuation follows it (so "the answer is a red circle" is no letter).
CUED = re.compile(r"\b(?:answer|option|choice)\b(?:\s*(?:is|:|=|-))?\s*(?:option\s+)?\(?([a-z])\b"
                  r"(?=\s*(?:[).,:;!]|$))", re.IGNORECASE)
# A letter of either case that opens the answer as a list label: "b) blue", "(c) red".
LEADING = re.compile(r"^\(?([a-z])[).:](?=\s|$)", re.IGNORECASE)
# A capital letter standing alone as a word. "A" and "I" followed by a lower-case word are
# the article and the pronoun ("A red circle.", "I think B"), unless the word is one that
# follows a letter ("A is right", "A or B").
STANDALONE = re.compile(r"(?<![^\W_])([A-Z])(?![^\W_]|'[a-z])")
NEXT_WORD = re.compile(r"\s+([a-z]+)")
AFTER_A_LETTER = {"is", "was", "seems", "looks", "appears", "would", "should", "must", "might", "could",
                  "can", "fits", "matches", "and", "or", "but", "because", "since", "as", "so", "then"}


def chosen_letter(answer: str, options: list[str]) -> str | None:
    """The option a free answer picks, as a letter, or None when it picks none or hedges.

    An answer that is exactly an option's text picks it. Otherwise reads "B", "b", "(B)",
    "**B**", "B.", "Answer: B", "The answer is B.", "Option B" and "B, blue" as B; two
    letters ("A or B") as no choice; with no letter, an option's text
    when exactly one option's text is in the answer (the longest, when one option's text
    contains another's). After VLMEvalKit's `can_infer_option` / `can_infer_text`
    (vlmeval/utils/matching_util.py), except that a capital "A" used as an article
    ("A red circle.") is no letter: the answer is read by the options' text instead.
    """
    allowed = LETTERS[: len(options)]
    text = MARKUP.sub("", answer).strip()
    bare = text.strip(" .,:;!()[]{}\"'")
    if bare and bare in [option.strip() for option in options]:  # options that are letters themselves
        return LETTERS[[option.strip() for option in options].index(bare)]
    if len(bare) == 1 and bare.upper() in allowed:
        return bare.upper()
    # Letters are looked for outside the options' own words: "Vitamin C", "Plan A" name an
    # option by its text (found below), not option C or A.
    letter_text = _without_option_texts(text, options)
    cued = [m.group(1) for m in CUED.finditer(letter_text)] + [m.group(1) for m in LEADING.finditer(letter_text)]
    letters = {letter.upper() for letter in cued if letter.upper() in allowed}
    for match in STANDALONE.finditer(letter_text):
        word = NEXT_WORD.match(letter_text, match.end())
        if match.group(1) in allowed and not (match.group(1) in "AI" and word and
                                              word.group(1) not in AFTER_A_LETTER):
            letters.add(match.group(1))
    if letters:
        return letters.pop() if len(letters) == 1 else None
    return _letter_by_text(text, options)


def _without_option_texts(answer: str, options: list[str]) -> str:
    """The answer with each option's text (of two characters or more) replaced by the word
    "text", whole words only, longest first; a single-letter option's text stays (it is read
    as a letter)."""
    for option in sorted((o.strip() for o in options if len(o.strip()) > 1), key=len, reverse=True):
        # a lower-case word in its place, so that "A blue square." still reads "A" as the article
        answer = re.sub(rf"(?<![^\W_]){re.escape(option)}(?![^\W_])", "text", answer, flags=re.IGNORECASE)
    return answer


def _letter_by_text(answer: str, options: list[str]) -> str | None:
    """The one option whose text the answer holds as whole words (options whose text is a
    part of another found option's text are set aside: "red circle" over "circle")."""
    answer = " ".join(answer.lower().split())
    found = [i for i, option in enumerate(options) if option.strip() and
             re.search(rf"(?<![^\W_]){re.escape(' '.join(option.lower().split()))}(?![^\W_])", answer)]
    longest = [i for i in found
               if not any(j != i and options[i].lower().strip() in options[j].lower() for j in found)]
    return LETTERS[longest[0]] if len(longest) == 1 else None


@register_task("multiple-choice")
class MultipleChoice(Task):
    """MMBench-style multiple choice with CircularEval over option rotations."""

    headline = "circular_accuracy"

    def items(self, options: TaskOptions) -> list[Item]:
        path = task_file(options)
        questions = read_choice_file(path) if path else task_dataset(options).choice_questions(options.seed)
        questions = seeded_sample(questions, options.limit, options.seed)
        return [item for question in questions for item in rotations(question, options.seed)]

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        """CircularEval (MMBench, Liu et al. 2023): a question counts only if every rotation is
        answered right. Rows keep the letter read under `chosen` (null when none);
        `no_choice` counts those. Raises UserError when a question id repeats a rotation."""
        rows, seen = [], set()
        for item, text in zip(items, predictions):
            key = (item.info["question_id"], item.info["rotation"])
            if key in seen:
                raise UserError(f"multiple-choice: question id {key[0]!r} is used by two questions")
            seen.add(key)
            letter = chosen_letter(text, item.info["options"])
            rows.append({**prediction_row(item, text.strip(), letter == item.references[0]), "chosen": letter})
        by_question: dict[str, bool] = {}
        for row in rows:
            by_question[row["question_id"]] = by_question.get(row["question_id"], True) and row["correct"]
        first = [row["correct"] for row in rows if row["rotation"] == 0]
        results = {"circular_accuracy": sum(by_question.values()) / max(1, len(by_question)),
                   "single_pass_accuracy": sum(first) / max(1, len(first)), "questions": len(by_question),
                   "no_choice": sum(row["chosen"] is None for row in rows)}
        return results, rows

    def without_question(self, item: Item) -> Item:
        """The options and instruction stay; the question line goes."""
        return replace(item, question=item.question.split("\n", 1)[1])
