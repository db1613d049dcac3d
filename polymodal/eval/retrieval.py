"""`retrieval`: text->image and image->text recall@1/5/10 in a dual encoder's space.

Task file (JSONL): {"image", "captions": [str]} (or "text"), image paths relative to the
file's folder; without one, the dataset's images and captions (`task_dataset`). A
caption's relevant images are all images with that exact caption (captions may repeat:
easy-VQA's "a red circle" describes many images), and an image's relevant captions are its own.
"""

from __future__ import annotations

import torch

from polymodal.contrastive.embed import embed_images, embed_texts, require_dual_encoder
from polymodal.eval.caption import caption_items
from polymodal.eval.tasks import Task, TaskOptions, register_task, seeded_sample

KS = (1, 5, 10)


def recall_at(scores: torch.Tensor, relevant: torch.Tensor, ks=KS) -> dict[str, float]:
    """scores [Q, N], relevant [Q, N] bool -> {"R@k": share of queries with a relevant hit in the top k}."""
    order = scores.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)  # [Q, N] relevance in ranked order
    return {f"R@{k}": hits[:, :k].any(1).float().mean().item() for k in ks}


@register_task("retrieval")
class Retrieval(Task):
    """Text->image and image->text retrieval recall (dual-encoder models)."""

    generative = False
    headline = "mean_recall"

    def run(self, model, options: TaskOptions, batch_size: int, items=None) -> tuple[dict, list[dict]]:
        require_dual_encoder(model, "task retrieval")
        items = seeded_sample(caption_items(options, ""), options.limit, options.seed)
        images, _, _ = embed_images(model, [item.images[0] for item in items], batch_size)  # [N, D]
        captions = sorted({caption for item in items for caption in item.references})
        texts = embed_texts(model, captions, batch_size)  # [T, D]
        index = {caption: row for row, caption in enumerate(captions)}
        relevant = torch.zeros(len(captions), len(items), dtype=torch.bool)  # [T, N]
        for column, item in enumerate(items):
            for caption in item.references:
                relevant[index[caption], column] = True
        scores = texts @ images.T  # [T, N]
        text_to_image = recall_at(scores, relevant)
        image_to_text = recall_at(scores.T, relevant.T, tuple(k for k in KS if k <= len(captions)))
        best = scores.T.argmax(1).tolist()  # each image's top caption
        rows = [{"id": item.id, "prompt": "image->text", "prediction": captions[choice],
                 "reference": item.references, "correct": bool(relevant[choice, column])}
                for column, (item, choice) in enumerate(zip(items, best))]
        recalls = list(text_to_image.values()) + list(image_to_text.values())
        return {"mean_recall": sum(recalls) / len(recalls), "images": len(items), "captions": len(captions),
                "text_to_image": text_to_image, "image_to_text": image_to_text}, rows
