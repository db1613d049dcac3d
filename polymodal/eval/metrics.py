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
    def scored(row: dict) -> str:  # the form that was scored, where the task normalises
        return row.get("normalized", row["prediction"])

    references = sorted({row["reference"] for row in rows})
    others = sorted({scored(row) for row in rows} - set(references))
    labels = references + others
    counts = defaultdict(Counter)
    for row in rows:
        counts[row["reference"]][scored(row)] += 1
    return labels, [[counts[r][p] for p in labels] for r in references]


def binary_metrics(predicted_yes: list[bool | None], truly_yes: list[bool]) -> dict[str, float]:
    """POPE's table (Li et al., EMNLP 2023): accuracy, precision, recall and F1 of "yes"
    (the positive class), the yes-ratio, and `unreadable`: the count of answers read as
    neither yes nor no (None in `predicted_yes`).

    An unreadable answer is never a "yes": it is wrong for accuracy, outside precision
    (neither numerator nor denominator), a miss for recall when the truth is yes, and
    outside the yes-ratio's numerator. A model that answers nothing scores 0 everywhere.
    """
    pairs = list(zip(predicted_yes, truly_yes))
    true_pos = sum(p is True and t for p, t in pairs)
    false_pos = sum(p is True and not t for p, t in pairs)
    false_neg = sum(t and p is not True for p, t in pairs)
    correct = sum(p is not None and p == t for p, t in pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    count = max(1, len(pairs))
    return {"accuracy": correct / count, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p is True for p in predicted_yes) / count,
            "unreadable": sum(p is None for p in predicted_yes), "n": len(pairs)}


YES_WORDS = {"yes", "yeah", "yep", "yup", "correct", "true", "affirmative", "sure", "certainly",
             "absolutely", "definitely", "indeed"}
NO_WORDS = {"no", "nope", "nah", "false", "incorrect", "negative"}
NEGATIONS = NO_WORDS | {"not", "none", "nothing", "never", "neither", "nor", "cannot", "absent",
                        "nobody", "nowhere"}
# Phrases that say something is there, for answers that do not begin with yes or no.
PRESENCE = re.compile(r"\b(there (is|are|exists?)|there's|i (can )?see|(is|are) (present|visible|shown)|"
                      r"shows?|showing|contains?|containing|depicts?|features?|includes?|has|have|"
                      r"appears?|exists?)\b")
# Answers that decline to decide; checked before negations, which several of them contain.
HEDGE = re.compile(r"\b((cannot|can't|can not|could not|couldn't|unable to|impossible to|hard to|"
                   r"difficult to|not possible to) (tell|say|determine|answer|know|confirm|decide|be sure|be certain)|"
                   r"(cannot|can't|can not) be (determined|told)|not (sure|certain|clear)|unsure|uncertain|unclear|no idea|"
                   r"(don't|do not) know|maybe|perhaps|possibly|might|may or may not)\b")
SENTENCE_END = re.compile(r"[.!?\n]")
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def read_yes_no(answer: str) -> bool | None:
    """A free answer to a yes/no question read as True (yes), False (no) or None
    (unreadable: empty, a hedge such as "I cannot tell.", or neither yes nor no).

    Follows the POPE script (RUCAIBox/POPE evaluate.py, also LLaVA's eval_pope.py): only the
    first sentence counts, and a negation in it means no. Unlike the script, which reads
    everything else as yes: contractions ("isn't", "doesn't") are negations; a leading
    yes/no word decides ("Yes, a circle, not a square." is yes); a hedge is unreadable; and
    a yes needs a yes word or a statement of presence ("There is a circle."), so "" and
    "I cannot tell." are None rather than yes.
    """
    text = answer.replace("\u2019", "'").lower()
    sentence = next((part for part in SENTENCE_END.split(text) if WORD.search(part)), "")
    words = WORD.findall(sentence)
    if not words:
        return None
    if words[0] in YES_WORDS or words[0] in NO_WORDS:
        return words[0] in YES_WORDS
    if HEDGE.search(sentence):
        return None
    if any(word in NEGATIONS or word.endswith("n't") for word in words):
        return False
    if any(word in YES_WORDS for word in words) or PRESENCE.search(sentence):
        return True
    return None


def says_yes(answer: str) -> bool:
    """Whether `read_yes_no` reads the answer as yes (an unreadable answer is not)."""
    return read_yes_no(answer) is True
