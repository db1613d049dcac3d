"""`pope`: object hallucination probes (Li et al., EMNLP 2023).

Answers are read as yes, no or unreadable by `metrics.read_yes_no` (the POPE script's
first-sentence reading, with contractions as negations and empty or hedging answers
counted apart as `unreadable`, never as yes); docs/metrics.md gives the formulas.

For each image, "Is there a {object} in the image?" about up to three objects it has
(answer yes) and as many it has not (answer no), the absent ones sampled three ways:
`random` from all objects, `popular` the most frequent objects in the dataset, and
`adversarial` those that most often appear together with the image's own objects.

Annotations: a JSONL file of {"image", "objects": [names]}, or the dataset's
(`task_dataset`; easy-VQA's images hold one shape each, and its objects are the shape
("circle"), the coloured shape ("red circle") and the colour ("red shape")).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from polymodal.data.errors import DataError
from polymodal.data.records import read_jsonl, record_images
from polymodal.errors import UserError
from polymodal.eval.metrics import binary_metrics, read_yes_no
from polymodal.eval.plots import plot_grouped_bars
from polymodal.eval.report import prediction_row
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    register_task,
    seeded_sample,
    task_dataset,
    task_file,
)

SETTINGS = ("random", "popular", "adversarial")
QUESTION = "Is there a {} in the image?"
Annotations = list[tuple[str, set[str]]]  # (image path, names of the objects in it)


def read_object_file(path: str | Path) -> Annotations:
    path = Path(path)
    annotations = []
    first_line: dict[str, int] = {}  # image -> the line that listed it
    for number, record in read_jsonl(path, ("image", "objects")):
        objects = record["objects"]
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise DataError("'objects' must be a list of names", path, line=number)
        image = record_images(path, number, record)[0]
        if str(image) in first_line:  # its probes would be asked twice, under the same ids
            raise DataError(f"image {record['image']!r} is listed again (first on line "
                            f"{first_line[str(image)]}); give all its objects on one line", path, line=number)
        first_line[str(image)] = number
        annotations.append((image, set(objects)))
    return annotations


def build_probes(annotations: Annotations, setting: str, per_image: int = 3,
                 seed: int = 0) -> list[tuple[str, str, bool]]:
    """(image, object, present) probes: per image as many absent objects as present ones."""
    if setting not in SETTINGS:
        raise UserError(f"unknown POPE setting {setting!r}; settings: {', '.join(SETTINGS)}, all")
    frequency = Counter(name for _, objects in annotations for name in objects)
    together: dict[str, Counter] = defaultdict(Counter)  # object -> objects seen in the same image
    for _, objects in annotations:
        for name in objects:
            together[name].update(objects - {name})
    vocabulary = sorted(frequency)
    rng = random.Random(seed)
    probes = []
    for image, objects in annotations:
        absent = [name for name in vocabulary if name not in objects]
        rng.shuffle(absent)  # ties below are broken at random, not by name
        count = min(per_image, len(objects), len(absent))
        if setting == "random":
            negatives = absent[:count]
        elif setting == "popular":
            negatives = sorted(absent, key=lambda name: -frequency[name])[:count]
        else:
            negatives = sorted(absent, key=lambda name: -sum(together[o][name] for o in objects))[:count]
        positives = rng.sample(sorted(objects), count)
        probes += [(image, name, True) for name in positives] + [(image, name, False) for name in negatives]
    return probes


@register_task("pope")
class Pope(Task):
    """POPE hallucination probes: accuracy, precision, recall, F1 and yes-ratio per setting."""

    def items(self, options: TaskOptions) -> list[Item]:
        path = task_file(options)
        annotations = read_object_file(path) if path else task_dataset(options).object_annotations()
        if options.limit is not None:  # about `limit` probes per setting: 6 per image
            annotations = seeded_sample(annotations, max(1, -(-options.limit // 6)), options.seed)
        settings = SETTINGS if options.setting == "all" else (options.setting,)
        items = []
        for setting in settings:
            for image, name, present in build_probes(annotations, setting, seed=options.seed):
                answer = "yes" if present else "no"
                items.append(Item(f"{setting}:{Path(image).stem}:{name}", QUESTION.format(name), [image],
                                  [answer], {"setting": setting, "object": name}))
        return items

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        """Per setting and averaged: `binary_metrics` of `read_yes_no`'s reading. Rows keep
        the reading under `read` ("yes", "no" or null); `unreadable` counts the nulls, which
        are wrong answers and never a yes."""
        rows = []
        for item, text in zip(items, predictions):
            read = read_yes_no(text)
            row = prediction_row(item, text.strip(), read is not None and read == (item.references[0] == "yes"))
            row["read"] = None if read is None else ("yes" if read else "no")
            rows.append(row)
        settings = {}
        for setting in dict.fromkeys(row["setting"] for row in rows):
            chosen = [row for row in rows if row["setting"] == setting]
            settings[setting] = binary_metrics([None if r["read"] is None else r["read"] == "yes" for r in chosen],
                                               [r["reference"] == "yes" for r in chosen])
        count = max(1, len(settings))
        results = {"accuracy": sum(s["accuracy"] for s in settings.values()) / count,
                   "f1": sum(s["f1"] for s in settings.values()) / count,
                   "unreadable": sum(row["read"] is None for row in rows), "settings": settings}
        return results, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        groups = {name: {k: v for k, v in metrics.items() if k not in ("n", "unreadable")}
                  for name, metrics in results["settings"].items()}
        plot_grouped_bars(groups, out / "pope.png", "POPE: object hallucination probes")
