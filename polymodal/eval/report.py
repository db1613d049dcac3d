"""What an evaluation leaves in its folder: results.json, predictions.jsonl, report.md and
pictures; every file written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.eval.tasks import Item
from polymodal.safe_files import atomic_write


def prediction_row(item: Item, prediction: str, correct: bool | float, reference=None,
                   normalized: str | None = None) -> dict:
    """One line of predictions.jsonl: id, prompt, prediction (as the model said it), reference,
    correct (+ `normalized`, the form that was scored, when the task normalises; + item info)."""
    reference = reference if reference is not None else (
        item.references[0] if len(item.references) == 1 else item.references)
    row = {"id": item.id, "prompt": item.question, "prediction": prediction, "reference": reference,
           "correct": correct, **item.info}
    if normalized is not None:
        row["normalized"] = normalized
    return row


def write_outputs(out: Path, title: str, results: dict, rows: list[dict], command: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(out / "predictions.jsonl", lambda p: p.write_text(lines))
    text = markdown_report(title, results, rows, command)
    atomic_write(out / "report.md", lambda p: p.write_text(text))


def markdown_report(title: str, results: dict, rows: list[dict], command: str = "",
                    examples: int = 8) -> str:
    """Headline numbers, a table for each nested group of metrics, and a few wrong answers."""
    parts = [f"# {title}\n"]
    if command:
        parts.append(f"`{command}`\n")
    scalars = {k: v for k, v in results.items() if not isinstance(v, dict | list)}
    parts.append(_table(["metric", "value"], [[k, _fmt(v)] for k, v in scalars.items()]))
    for name, group in results.items():
        if isinstance(group, dict) and group:
            parts.append(f"\n## {name.replace('_', ' ')}\n")
            parts.append(_group_table(group))
    wrong = [row for row in rows if not row.get("correct")][:examples]
    if wrong:
        parts.append("\n## Examples of wrong answers\n")
        parts.append(_table(["id", "prompt", "prediction", "reference"],
                            [[r["id"], r["prompt"], r["prediction"], r["reference"]] for r in wrong]))
    return "\n".join(parts) + "\n"


def _group_table(group: dict) -> str:
    if all(isinstance(v, dict) for v in group.values()):  # {row: {column: value}}
        columns = list(dict.fromkeys(key for v in group.values() for key in v))
        return _table(["", *columns], [[name, *(_fmt(v.get(c, "")) for c in columns)]
                                       for name, v in group.items()])
    return _table(["", "value"], [[k, _fmt(v)] for k, v in group.items()])


def _table(header: list[str], body: list[list]) -> str:
    def cells(values):
        return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    return "\n".join([cells(header), cells(["---"] * len(header)), *(cells(r) for r in body)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)
