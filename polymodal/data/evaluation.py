"""What a dataset offers the evaluation tasks that build their questions from it.

A task given a task file (`--data FILE.jsonl`) reads it; without one, it asks a dataset
(`TaskOptions.dataset`, a dataset format whose options class derives from `EvaluationData`)
at `--split`, or at the folder `--data` names, for what the task needs: short-answer
questions, captions, object annotations (POPE), multiple-choice questions, attribute labels
(zero-shot) or spoken captions. easy-VQA (data/easy_vqa.py) offers them all; a dataset
offers those it can, and a task that asks for one it cannot is refused by name.
"""

from __future__ import annotations

from polymodal.data.sample import Item, Sample
from polymodal.errors import UserError

Caption = tuple[str, str]  # (image path, caption)
Objects = tuple[str, set[str]]  # (image path, names of the objects in it)
Choice = tuple[str, list[str], str, list[str]]  # id, images, question, options (the right one first)
Label = tuple[str, str, str]  # (image path, attribute, label)


class EvaluationData:
    """The questions a dataset lends the evaluation tasks; each method unsupported by default.

    Subclasses are a format's options (a DatasetConfig subclass) and build themselves for a
    split or a folder with `for_evaluation`.
    """

    format: str  # the dataset format's name (a field of the options class)

    @classmethod
    def for_evaluation(cls, split: str, folder: str | None) -> EvaluationData:
        """The dataset at `split` of its own source, or at `folder` (a folder in its layout)."""
        raise NotImplementedError

    def _unsupported(self, what: str):
        raise UserError(f"dataset {self.format} has no {what} to evaluate on; give a task file (--data FILE.jsonl)")

    def question_items(self) -> list[Item]:
        """Short-answer questions, one reference each, `info["type"]` their question type."""
        self._unsupported("short-answer questions")

    def caption_pairs(self) -> list[Caption]:
        self._unsupported("captions")

    def object_annotations(self) -> list[Objects]:
        self._unsupported("object annotations")

    def choice_questions(self, seed: int) -> list[Choice]:
        """Multiple-choice questions, the distractors drawn with `seed`."""
        self._unsupported("multiple-choice questions")

    def attribute_labels(self) -> list[Label]:
        self._unsupported("attribute labels")

    def label_templates(self, attribute: str) -> list[str] | None:
        """Zero-shot prompt templates ({} for the label) for `attribute`; None: the task's own."""
        return None

    def spoken_captions(self) -> tuple[list[Sample], list[Caption]]:
        """(spoken caption clips, whose `messages[-1]` is the caption said; the image gallery)."""
        self._unsupported("spoken captions")
