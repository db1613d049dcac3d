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


def binary_metrics(predicted_yes: list[bool], truly_yes: list[bool]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" (the positive class), and the yes-ratio:
    POPE's table."""
    pairs = list(zip(predicted_yes, truly_yes))
    true_pos = sum(p and t for p, t in pairs)
    false_pos = sum(p and not t for p, t in pairs)
    false_neg = sum(t and not p for p, t in pairs)
    correct = sum(p == t for p, t in pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    count = max(1, len(pairs))
    return {"accuracy": correct / count, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(predicted_yes) / count, "n": len(pairs)}


def says_yes(answer: str) -> bool:
    """POPE's reading of a free answer: "no" when it has the word no or not, else "yes"."""
    words = set(re.findall(r"[a-z']+", answer.lower()))
    return not words & {"no", "not"}
