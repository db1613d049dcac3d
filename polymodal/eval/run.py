"""Evaluate a model on a task: items -> answers -> metrics -> files in the output folder."""

from __future__ import annotations

from pathlib import Path

from polymodal.eval.report import write_outputs
from polymodal.eval.tasks import Item, Task, TaskOptions, get_task


def evaluate(model, task: str | Task, options: TaskOptions | None = None, batch_size: int = 32,
             out: str | Path | None = None, command: str = "",
             items: list[Item] | None = None) -> tuple[dict, list[dict]]:
    """(results, rows): the headline metrics (with task, split and n) and one row per item.
    `items`: the task's own, when already read. With `out`, writes results.json,
    predictions.jsonl, report.md and the task's pictures."""
    task = get_task(task) if isinstance(task, str) else task
    options = options or TaskOptions()
    metrics, rows = task.run(model, options, batch_size, items)
    count = len(items) if items is not None else len(rows)
    results = {"task": task.name, "split": options.data or options.split, "n": count, **metrics}
    if out is not None:
        out = Path(out)
        write_outputs(out, f"{task.name} evaluation", results, rows, command)
        task.pictures(results, rows, out)
    return results, rows
