"""Evaluate a model on a task: items -> answers -> metrics -> files in the output folder."""

from __future__ import annotations

from pathlib import Path

from polymodal.errors import UserError
from polymodal.eval.answer import answer_items
from polymodal.eval.report import write_outputs
from polymodal.eval.tasks import Item, Task, TaskOptions, get_task


def evaluate(model, task: str | Task, options: TaskOptions | None = None, batch_size: int = 32,
             out: str | Path | None = None, command: str = "",
             items: list[Item] | None = None) -> tuple[dict, list[dict]]:
    """(results, rows): the headline metrics (with task, split and n) and one row per item.
    `items` are the task's own, when already read. With `out`, writes results.json, predictions.jsonl, report.md and the task's pictures."""
    task = get_task(task) if isinstance(task, str) else task
    options = options or TaskOptions()
    items = task.items(options) if items is None else items
    if not items:
        raise UserError(f"task {task.name}: the data holds no questions")
    predictions = answer_items(model, items, batch_size, task.max_new_tokens, desc=task.name)
    metrics, rows = task.score(items, predictions)
    results = {"task": task.name, "split": options.data or options.split, "n": len(items), **metrics}
    if out is not None:
        out = Path(out)
        write_outputs(out, f"{task.name} evaluation", results, rows, command)
        task.pictures(results, rows, out)
    return results, rows
