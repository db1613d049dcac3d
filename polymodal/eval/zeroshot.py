"""`zeroshot`: classify images by the text embedding of each label, CLIP-style, with
prompt ensembling (each label's embedding is the mean of its templates' embeddings).

Task file (JSONL): {"image", "label"} (optionally "attribute", to score several label
sets at once), image paths relative to the file's folder; templates from `--templates`
(default "a photo of a {}."). Without a file: the dataset's attribute labels and its own
templates (`task_dataset`; easy-VQA's images are classified by shape and by colour, each
ensembled over the other attribute's words: "a red {}", "a blue {}", ... for shapes, as
CLIP ensembles over contexts).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from polymodal.contrastive.embed import embed_images, embed_texts, require_dual_encoder
from polymodal.data.evaluation import Label
from polymodal.data.records import read_jsonl, record_images
from polymodal.errors import UserError
from polymodal.eval.metrics import confusion
from polymodal.eval.plots import plot_confusion
from polymodal.eval.tasks import (
    Task,
    TaskOptions,
    register_task,
    seeded_sample,
    task_dataset,
    task_file,
)

DEFAULT_TEMPLATES = ["a photo of a {}."]
Labelled = list[Label]  # (image, attribute, label)


def read_label_file(path: str | Path) -> Labelled:
    path = Path(path)
    return [(record_images(path, number, record)[0], str(record.get("attribute", "label")), str(record["label"]))
            for number, record in read_jsonl(path, ("image", "label"))]


def class_embeddings(model, labels: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D]: per label, the normalised mean of its templates' embeddings."""
    if any("{}" not in template for template in templates):
        raise UserError("every template needs {} where the label goes")
    texts = [template.format(label) for label in labels for template in templates]
    embeddings = embed_texts(model, texts).view(len(labels), len(templates), -1)
    return F.normalize(embeddings.mean(1), dim=-1)


@register_task("zeroshot")
class ZeroShot(Task):
    """Zero-shot classification by text prompts (dual-encoder models)."""

    generative = False

    def run(self, model, options: TaskOptions, batch_size: int, items=None) -> tuple[dict, list[dict]]:
        require_dual_encoder(model, "task zeroshot")
        path = task_file(options)
        dataset = None if path else task_dataset(options)
        labelled = read_label_file(path) if path else dataset.attribute_labels()
        labelled = seeded_sample(labelled, options.limit, options.seed)
        images = list(dict.fromkeys(image for image, _, _ in labelled))
        embeddings, _, _ = embed_images(model, images, batch_size)
        row_of = {image: index for index, image in enumerate(images)}
        by_attribute: dict[str, list] = defaultdict(list)
        for image, attribute, label in labelled:
            by_attribute[attribute].append((image, label))
        rows, accuracy = [], {}
        for attribute, pairs in by_attribute.items():
            labels = sorted({label for _, label in pairs})
            templates = options.templates or (dataset and dataset.label_templates(attribute)) or DEFAULT_TEMPLATES
            classes = class_embeddings(model, labels, templates)  # [C, D]
            scores = embeddings[[row_of[image] for image, _ in pairs]] @ classes.T  # [N, C]
            for (image, label), choice in zip(pairs, scores.argmax(1).tolist()):
                rows.append({"id": Path(image).stem, "prompt": attribute, "prediction": labels[choice],
                             "reference": label, "correct": labels[choice] == label, "attribute": attribute})
            accuracy[attribute] = sum(r["correct"] for r in rows if r["attribute"] == attribute) / len(pairs)
        return {"accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "accuracy_by_attribute": accuracy}, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        for attribute, value in results["accuracy_by_attribute"].items():
            labels, counts = confusion([r for r in rows if r["attribute"] == attribute])
            plot_confusion(labels, counts, out / f"confusion_{attribute}.png",
                           f"zero-shot {attribute}: accuracy {value:.1%}")
