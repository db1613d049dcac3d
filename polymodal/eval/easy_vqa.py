"""`easy-vqa`: short answers scored by exact match after normalising, per question type,
with a confusion matrix. The questions are the dataset's (`TaskOptions.dataset`: easy-VQA's
split, or a folder in its layout)."""

from __future__ import annotations

from pathlib import Path

from polymodal.eval.metrics import accuracy_by, confusion, normalize
from polymodal.eval.plots import plot_confusion
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import Item, Task, TaskOptions, register_task, seeded_sample, task_dataset


def question_items(options: TaskOptions) -> list[Item]:
    """The dataset's questions, one item each, a fixed seeded sample of `options.limit`."""
    return seeded_sample(task_dataset(options).question_items(), options.limit, options.seed)


@register_task("easy-vqa")
class EasyVQA(Task):
    """easy-VQA questions: exact match, by question type (shape, colour, yes/no)."""

    def items(self, options: TaskOptions) -> list[Item]:
        return question_items(options)

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        rows = []
        for item, text in zip(items, predictions):
            prediction = normalize(text)
            rows.append(prediction_row(item, text.strip(), prediction == item.references[0],
                                       normalized=prediction))
        results = {"accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
                   "accuracy_by_type": accuracy_by(rows, "type")}
        return results, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        labels, counts = confusion(rows)
        plot_confusion(labels, counts, out / "confusion.png", f"easy-VQA: accuracy {results['accuracy']:.1%}")
