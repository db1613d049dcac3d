"""Contrastive losses over a batch of matched (image, text) embeddings.

Both take L2-normalised embeddings `image` [B, D] and `text` [B, D] whose row i is a
pair, and `positives` [B, B] (bool): which texts match which image. The diagonal is the
default; passing text identity instead stops two images captioned "a red circle" from
being pushed apart as if they were a negative pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _diagonal(batch: int, device) -> torch.Tensor:
    return torch.eye(batch, dtype=torch.bool, device=device)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy image->text and text->image, averaged.

    `logit_scale` is the log of the inverse temperature (learned, as in CLIP). With
    several positives in a row the target spreads evenly over them.
    """
    positives = _diagonal(len(image), image.device) if positives is None else positives
    logits = logit_scale.exp() * image @ text.T  # [B, B]
    per_image = positives.float() / positives.sum(1, keepdim=True)
    per_text = positives.T.float() / positives.T.sum(1, keepdim=True)
    return (F.cross_entropy(logits, per_image) + F.cross_entropy(logits.T, per_text)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is its own binary decision,
    summed over the B*B pairs and divided by B (Zhai et al., 2023)."""
    positives = _diagonal(len(image), image.device) if positives is None else positives
    logits = logit_scale.exp() * image @ text.T + logit_bias  # [B, B]
    signs = positives.float() * 2 - 1  # +1 for a match, -1 otherwise
    return -F.logsigmoid(signs * logits).sum() / len(image)
