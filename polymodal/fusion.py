"""Fusion: how connector tokens reach the LLM. `inline` scatters them into the text embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import FusionConfig
from polymodal.errors import UserError
from polymodal.registry import FUSIONS, register_fusion


@dataclass
class InlineFusionConfig(FusionConfig):
    kind: str = "inline"


@register_fusion("inline", config=InlineFusionConfig)
class InlineFusion(nn.Module):
    """Each image's K tokens replace its K placeholder positions in the text (LLaVA, Fuyu)."""

    def __init__(self, config: InlineFusionConfig | None = None):
        super().__init__()

    def forward(
        self, text_embeds: torch.Tensor, placeholder_mask: torch.Tensor, image_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """text_embeds [B, T, D], placeholder_mask [B, T] bool, image_tokens [N, K, D] -> [B, T, D].

        Images fill placeholders in reading order: sample by sample, left to right.
        """
        slots = int(placeholder_mask.sum())
        given = 0 if image_tokens is None else image_tokens.shape[0] * image_tokens.shape[1]
        if slots != given:
            raise UserError(f"image placeholders and image tokens differ: {slots} placeholder "
                            f"positions, {given} image tokens")
        if image_tokens is None:
            return text_embeds
        flat = image_tokens.reshape(-1, image_tokens.shape[-1]).to(text_embeds.dtype)
        return text_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), flat)


def build_fusion(config: FusionConfig) -> nn.Module:
    return FUSIONS.get(config.kind).builder(config)
