"""`vqa`: open questions with several reference answers; VQAv2 normalisation, exact match
and VQA soft accuracy (the official leave-one-out mean, `vqa_answers.soft_accuracy`;
docs/metrics.md gives the formula).

Task file (JSONL): {"image": path or "images": [paths], "question": str, "answers": [str]},
image paths relative to the file's folder.
"""

from __future__ import annotations

from pathlib import Path

from polymodal.data.errors import DataError
from polymodal.data.records import read_jsonl, record_images
from polymodal.errors import UserError
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import Item, Task, TaskOptions, register_task, seeded_sample
from polymodal.eval.vqa_answers import normalize_vqa, soft_accuracy


def read_vqa_file(path: str | Path) -> list[Item]:
    path = Path(path)
    items = []
    for number, record in read_jsonl(path, ("question", "answers")):
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError("'answers' must be a non-empty list of strings", path, line=number)
        empty = [answer for answer in answers if not normalize_vqa(answer)]
        if empty:  # an empty prediction would match it and score 1
            raise DataError(f"answer {empty[0]!r} is empty once normalised (articles and punctuation "
                            f"are dropped)", path, line=number)
        items.append(Item(str(record.get("id", number)), str(record["question"]),
                          record_images(path, number, record), answers))
    return items


@register_task("vqa")
class VQA(Task):
    """Open-ended VQA from a JSONL file: VQAv2 soft accuracy and exact match."""

    headline = "soft_accuracy"

    def items(self, options: TaskOptions) -> list[Item]:
        if options.data is None:
            raise UserError("task vqa needs --data FILE.jsonl ({image, question, answers} per line)")
        return seeded_sample(read_vqa_file(options.data), options.limit, options.seed)

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        rows = []
        for item, text in zip(items, predictions):
            answer = normalize_vqa(text)
            row = prediction_row(item, text.strip(), soft_accuracy(text, item.references),
                                 item.references, normalized=answer)
            row["exact_match"] = answer in {normalize_vqa(r) for r in item.references}
            rows.append(row)
        count = max(1, len(rows))
        results = {"soft_accuracy": sum(r["correct"] for r in rows) / count,
                   "exact_match": sum(r["exact_match"] for r in rows) / count}
        return results, rows
