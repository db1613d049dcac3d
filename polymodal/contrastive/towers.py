"""The two towers: an image encoder with a pooled projection, and a sentence-embedding text model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.base import Encoder


class ImageHead(nn.Module):
    """Encoder tokens [B, S, D_enc] -> one L2-normalised embedding [B, dim].

    `pool`: `mean` over tokens (ViTs without a class token), `max` (CNN feature maps:
    a small object lights up a few cells), or `first` (a class token).
    """

    def __init__(self, in_dim: int, dim: int, pool: str):
        super().__init__()
        self.pool = pool
        self.projection = nn.Linear(in_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "max":
            pooled = features.amax(1)
        elif self.pool == "first":
            pooled = features[:, 0]
        else:
            pooled = features.mean(1)
        return F.normalize(self.projection(pooled), dim=-1)


class ImageTower(nn.Module):
    """Pixels [B, 3, S, S] in [0, 1] -> embeddings [B, dim]."""

    def __init__(self, encoder: Encoder, dim: int, pool: str):
        super().__init__()
        self.encoder = encoder
        self.head = ImageHead(encoder.out_dim, dim, pool)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))


class TextTower(nn.Module):
    """Texts -> L2-normalised embeddings [B, dim], sentence-transformers style: the
    attention-masked mean of the last hidden states (how all-MiniLM-L6-v2 was trained),
    then an optional linear projection when the shared space is narrower or wider.

    While the tower is frozen each distinct text is embedded once and remembered; a
    caption dataset repeats its captions, so most steps never run the text model.
    """

    def __init__(self, model, tokenizer, dim: int | None = None, max_length: int = 128):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        width = model.config.hidden_size
        self.projection = nn.Linear(width, dim) if dim and dim != width else None
        self.dim = dim or width
        self._frozen_cache: dict[str, torch.Tensor] = {}

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, texts: list[str]) -> torch.Tensor:
        if not self.frozen:
            self._frozen_cache.clear()
            return self._embed(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._frozen_cache]
        if missing:
            was_training = self.model.training
            self.model.eval()  # a frozen tower never runs dropout, even in a training stage
            with torch.no_grad():
                # One text at a time: padding it to a batch's longest would change its
                # embedding in the last bits, and a resumed run must see identical numbers.
                self._frozen_cache.update((text, self._embed([text])[0]) for text in missing)
            self.model.train(was_training)
        return torch.stack([self._frozen_cache[t] for t in texts])

    def _embed(self, texts: list[str]) -> torch.Tensor:
        # A text that spells "[SEP]" or "</s>" is text: the tokenizer adds the real markers.
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                split_special_tokens=True, return_tensors="pt").to(self.model.device)
        hidden = self.model(**tokens).last_hidden_state  # [B, T, W]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, dim=-1)
