"""`easy-vqa-binding`: fast concept binding (Frozen: Tsimpoukelli et al. 2021, "Multimodal
Few-Shot Learning with Frozen Language Models", §4.3) on easy-VQA's shapes.

Each question has its own made-up names for the shapes (circle = "dax", rectangle = "wug", ...:
as many of `NONSENSE_WORDS` as there are shapes, drawn seeded per question). Its shots are other
images named so ("What is this?" -> "dax"), then the question's image: "What is this?". The answer
is the made-up name of its shape, which only the shots tell: with 0 shots no word is named and
the task cannot be solved (accuracy ~0).

Which shapes the shots show: Frozen's N-way tasks show every class once per "inner shot", so
here the K examples go through the classes: the question's shape is always among them, then the
other shapes in a seeded order, then all classes again in a fresh order until there are K; the
examples are shown in a shuffled order. So 1 shot names only the question's shape (copying the one
word shown solves it), 2 shots name it and one other (2-way, chance 1/2), 3 or more name all three
(3-way, chance 1/3). Each example is another image of its shape from the same split, drawn seeded.
Accuracy is exact match of the made-up word after `metrics.normalize` (case, surrounding
whitespace and punctuation dropped).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from polymodal.errors import UserError
from polymodal.eval.metrics import accuracy_by, normalize
from polymodal.eval.report import prediction_row
from polymodal.eval.shots import with_examples
from polymodal.eval.tasks import Item, Task, TaskOptions, register_task, seeded_sample, task_dataset

# Nonsense words of the word-learning literature (Gleason's "wug", Frozen's "dax" and
# "blicket"); none is an English word, a shape or a colour.
NONSENSE_WORDS = ("dax", "blicket", "wug", "toma", "fep", "zib", "kiki", "tufa")
QUESTION = "What is this?"


def binding_item(image: str, shape: str, shapes: list[str], seed: int) -> Item:
    """The question about `image`, its shapes named by words drawn for it (info: shape, names)."""
    identifier = Path(image).stem
    words = random.Random(f"{seed}:{identifier}").sample(NONSENSE_WORDS, len(shapes))
    names = dict(zip(shapes, words))
    return Item(identifier, QUESTION, [image], [names[shape]], {"shape": shape, "names": names})


def shown_shapes(own: str, shapes: list[str], shots: int, rng: random.Random) -> list[str]:
    """The shape of each of `shots` examples: `own` first, then the others, then whole rounds of
    all shapes, each round in a seeded order; returned shuffled (the module's docstring says why)."""
    others = [shape for shape in shapes if shape != own]
    rng.shuffle(others)
    sequence = [own, *others][:shots]
    while len(sequence) < shots:
        round_ = list(shapes)
        rng.shuffle(round_)
        sequence += round_[: shots - len(sequence)]
    rng.shuffle(sequence)
    return sequence


def binding_examples(item: Item, by_shape: dict[str, list[Item]], shots: int, seed: int) -> list[Item]:
    """`shots` other images, each asked "What is this?" and answered by the name `item` gives
    its shape. Raises UserError when a shape has too few other images."""
    rng = random.Random(f"{seed}:{item.id}:shots")
    names = item.info["names"]
    shapes = shown_shapes(item.info["shape"], sorted(names), shots, rng)
    drawn = {}
    for shape, count in sorted(Counter(shapes).items()):
        others = [example for example in by_shape[shape] if example.images != item.images]
        if len(others) < count:
            raise UserError(f"--shots {shots}: only {len(others)} other {shape} image(s) to show")
        drawn[shape] = rng.sample(others, count)
    return [replace(drawn[shape].pop(), references=[names[shape]]) for shape in shapes]


@register_task("easy-vqa-binding")
class EasyVQABinding(Task):
    """Made-up names for easy-VQA's shapes, taught by the shots: exact match of the name."""

    max_new_tokens = 6

    def items(self, options: TaskOptions) -> list[Item]:
        """One question per image whose shape the dataset tells (easy-VQA's split, or a folder
        in its layout), a fixed seeded sample of `options.limit`."""
        labels = [(image, value) for image, attribute, value in task_dataset(options).attribute_labels()
                  if attribute == "shape"]
        if not labels:
            raise UserError(f"task {self.name}: the data names no shapes")
        shapes = sorted({shape for _, shape in labels})
        if len(shapes) > len(NONSENSE_WORDS):
            raise UserError(f"task {self.name}: {len(shapes)} shapes but {len(NONSENSE_WORDS)} made-up words")
        items = [binding_item(image, shape, shapes, options.seed) for image, shape in labels]
        return seeded_sample(items, options.limit, options.seed)

    def with_shots(self, model, items: list[Item], options: TaskOptions) -> list[Item]:
        """Each question after `options.shots` images named with its own words."""
        by_shape = defaultdict(list)
        for example in self.items(replace(options, limit=None, shots=0)):
            by_shape[example.info["shape"]].append(example)
        return [with_examples(item, binding_examples(item, by_shape, options.shots, options.seed),
                              model.processor.placeholders) for item in items]

    def run(self, model, options: TaskOptions, batch_size: int,
            items: list[Item] | None = None) -> tuple[dict, list[dict]]:
        """As every task's, and `ways` (how many shapes the shots name) and `chance` (1/ways:
        one of the named words picked at random; 0 without shots, when none is named)."""
        results, rows = super().run(model, options, batch_size, items)
        ways = min(options.shots, len(rows[0]["names"]))
        return {**results, "ways": ways, "chance": 1 / ways if ways else 0.0}, rows

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        rows = []
        for item, text in zip(items, predictions):
            said = normalize(text)
            rows.append(prediction_row(item, text.strip(), said == item.references[0], normalized=said))
        count = max(1, len(rows))
        results = {"accuracy": sum(row["correct"] for row in rows) / count,
                   "accuracy_by_shape": accuracy_by(rows, "shape"),
                   # the shape's own English name: the answer of a model that ignores the shots
                   "said_shape_name": sum(row["normalized"] == row["shape"] for row in rows) / count,
                   "said_a_made_up_word": sum(row["normalized"] in NONSENSE_WORDS for row in rows) / count}
        return results, rows
