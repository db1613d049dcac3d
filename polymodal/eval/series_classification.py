"""`series-classification`: a series and a question ("What activity is this?"), answered in
words, matched to the set's class labels: accuracy overall and per class, and a confusion
matrix (`confusion.png`).

The data (`--data`): `aeon:NAME`, a classification set aeon bundles (its test split;
data/aeon.py), or a series task file, read by the `series` data format (its JSONL manifest
of {"series": FILE, "label": ...} or a UCR/UEA `.ts` file; data/series.py). Answers are
generated (greedy, a few tokens) and read as a label by `read_label`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from polymodal.errors import UserError
from polymodal.eval.metrics import accuracy_by, confusion, normalize
from polymodal.eval.plots import plot_confusion
from polymodal.eval.report import prediction_row
from polymodal.eval.series_inputs import count_cropped
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    named_dataset,
    register_task,
    seeded_sample,
    task_dataset,
)

NO_LABEL = "(no label)"  # the confusion matrix's column for answers that name no single label


def read_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer gives, or None when it gives none or several.

    The answer counts as a label when, normalised (case, spaces, surrounding punctuation:
    `metrics.normalize`), it equals the label, or else names exactly one label as whole
    words ("The person is walking." -> walking; "walking or running" -> None). A label found
    only inside a longer label it also names ("standing" in "standing up") is not counted
    twice. Whole words: "1" is not found in "10".

    Example:
        read_label("Badminton!", ["badminton", "running"]) == "badminton"
    """
    said = normalize(answer)
    by_form = {normalize(label): label for label in labels}
    if said in by_form:
        return by_form[said]
    found = {form for form in by_form if form and _names(said, form)}
    found = {form for form in found if not any(form != other and _names(other, form) for other in found)}
    return by_form[found.pop()] if len(found) == 1 else None


def _names(text: str, words: str) -> bool:
    """Whether `words` stand in `text` as whole words."""
    return re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text) is not None


@register_task("series-classification")
class SeriesClassification(Task):
    """A series' class answered in words: accuracy overall and per class, a confusion matrix."""

    max_new_tokens = 10  # a label of a few words ("badminton", "gesture 3")

    def __init__(self):
        self.labels: list[str] = []  # every class of the set read by `items`, not only those sampled

    def items(self, options: TaskOptions) -> list[Item]:
        if not options.data:
            raise UserError("task series-classification needs --data: aeon:NAME (a set aeon bundles; "
                            "its test split) or a series file (the series format's JSONL manifest or a .ts file)")
        dataset = options if named_dataset(options.data) else replace(options, dataset="series")
        items = [item for item in task_dataset(dataset).question_items() if item.info.get("type") == "class"]
        if not items:
            raise UserError(f"--data {options.data}: holds no labelled series (forecasting windows are "
                            f"evaluated by --task forecast)")
        self.labels = sorted({item.references[0] for item in items})
        return seeded_sample(items, options.limit, options.seed)

    def run(self, model, options: TaskOptions, batch_size: int,
            items: list[Item] | None = None) -> tuple[dict, list[dict]]:
        """As every task's, and `cropped`: how many series were longer than the encoder's
        length (each kept its last `length` steps; `eval.series_inputs`)."""
        items = self.items(options) if items is None else items
        results, rows = super().run(model, options, batch_size, items)
        return {**results, "cropped": count_cropped(model, items, self.name)}, rows

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        labels = sorted({*self.labels, *(item.references[0] for item in items)})
        rows = []
        for item, text in zip(items, predictions):
            label = read_label(text, labels)
            rows.append(prediction_row(item, text.strip(), label == item.references[0],
                                       normalized=NO_LABEL if label is None else label))
        by_class = accuracy_by(rows, "reference")
        results = {"accuracy": sum(row["correct"] for row in rows) / max(1, len(rows)),
                   "balanced_accuracy": sum(by_class.values()) / max(1, len(by_class)),
                   "no_label": sum(row["normalized"] == NO_LABEL for row in rows),
                   "classes": len(labels),
                   "accuracy_by_class": by_class}
        return results, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        labels, counts = confusion(rows)
        plot_confusion(labels, counts, out / "confusion.png",
                       f"series classification\naccuracy {results['accuracy']:.1%}")
