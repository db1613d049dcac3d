"""`easy-vqa`: exact match after normalising, per question type, with a confusion matrix."""

from __future__ import annotations

from pathlib import Path

from polymodal.data.formats import easy_vqa_folder, easy_vqa_question_type, read_easy_vqa_questions
from polymodal.eval.metrics import accuracy_by, confusion, normalize
from polymodal.eval.plots import plot_confusion
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import Item, Task, TaskOptions, register_task, seeded_sample


def easy_vqa_items(options: TaskOptions) -> list[Item]:
    """The questions of an easy-VQA split (or folder in its layout), one item each."""
    questions = read_easy_vqa_questions(easy_vqa_folder(options.split, options.data))
    items = [Item(f"{Path(image).stem}:{number}", question, [image], [answer],
                  {"type": easy_vqa_question_type(answer)})
             for number, (question, answer, image) in enumerate(questions)]
    return seeded_sample(items, options.limit, options.seed)


@register_task("easy-vqa")
class EasyVQA(Task):
    """easy-VQA questions: exact match, by question type (shape, colour, yes/no)."""

    def items(self, options: TaskOptions) -> list[Item]:
        return easy_vqa_items(options)

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
