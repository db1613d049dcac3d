"""`inline` fusion (LLaVA, Fuyu): the connector's tokens replace their placeholders in the text's
input embeddings; the decoder's layers stay as they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import FusionConfig
from polymodal.registry import register_fusion


@dataclass
class InlineFusionConfig(FusionConfig):
    kind: str = "inline"


@register_fusion("inline", config=InlineFusionConfig)
class InlineFusion(nn.Module):
    """Each medium's K tokens replace its K placeholder positions in the text (LLaVA, Fuyu)."""

    def __init__(self, config: InlineFusionConfig | None = None):
        super().__init__()

    def forward(self, text_embeds: torch.Tensor, placeholder_mask: torch.Tensor,
                media_tokens: torch.Tensor | None, modality: str = "image") -> torch.Tensor:
        """text_embeds [B, T, D], placeholder_mask [B, T] bool, media_tokens [N, K, D] -> [B, T, D]
        (`scatter_media`)."""
        return scatter_media(text_embeds, placeholder_mask, media_tokens, modality)


def scatter_media(text_embeds: torch.Tensor, placeholder_mask: torch.Tensor, media_tokens: torch.Tensor | None,
                  modality: str = "image") -> torch.Tensor:
    """text_embeds [B, T, D] with media_tokens [N, K, D] at placeholder_mask [B, T] -> [B, T, D].

    Media fill their modality's placeholders in reading order: sample by sample, left to
    right. Raises RuntimeError when the placeholder positions and the tokens differ in
    number (the processor counted them against the media already: a bug, not the user's).
    """
    slots = int(placeholder_mask.sum())
    given = 0 if media_tokens is None else media_tokens.shape[0] * media_tokens.shape[1]
    if slots != given:
        raise RuntimeError(f"{modality} placeholders and {modality} tokens differ: {slots} "
                           f"placeholder positions, {given} {modality} tokens")
    if media_tokens is None:
        return text_embeds
    flat = media_tokens.reshape(-1, media_tokens.shape[-1]).to(text_embeds.dtype)
    return text_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), flat)
