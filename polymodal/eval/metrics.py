"""Answer normalisation and accuracy tables."""

from __future__ import annotations

import re
from collections import Counter, defaultdict


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation dropped."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:\"'")


def accuracy_by(rows: list[dict], key: str) -> dict[str, float]:
    totals, right = Counter(), Counter()
    for row in rows:
        totals[row[key]] += 1
        right[row[key]] += row["correct"]
    return {name: right[name] / totals[name] for name in sorted(totals)}


def confusion(rows: list[dict]) -> tuple[list[str], list[list[int]]]:
    """Labels (references, then other predictions) and counts[reference][prediction]."""
    references = sorted({row["reference"] for row in rows})
    others = sorted({row["prediction"] for row in rows} - set(references))
    labels = references + others
    counts = defaultdict(Counter)
    for row in rows:
        counts[row["reference"]][row["prediction"]] += 1
    return labels, [[counts[r][p] for p in labels] for r in references]
