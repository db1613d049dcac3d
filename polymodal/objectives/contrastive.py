"""`objective: contrastive`: an encoder against a text tower on (medium, caption) pairs, CLIP-
or SigLIP-style, without the LLM (Radford et al., 2021; Zhai et al., 2023)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from polymodal.config import ContrastiveConfig, StageConfig
from polymodal.contrastive.losses import clip_loss, siglip_loss
from polymodal.contrastive.model import DualEncoder
from polymodal.errors import UserError
from polymodal.objectives.base import (
    StepLoss,
    TrainsStageParts,
    encoder_is_frozen,
    refuse_answered_data,
    refuse_lm_loss_options,
)
from polymodal.objectives.features import FeatureCache
from polymodal.processing.batch import PairBatch
from polymodal.registry import register_objective


def text_id(text: str) -> int:
    """A stable 63-bit id of a text: equal captions are positives of each other."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@register_objective("contrastive")
class Contrastive(TrainsStageParts):
    """The contrastive loss of (medium, text) pairs over the global batch.

    The module it trains: a dual-encoder model itself, or for a multimodal LM a
    `DualEncoder` around the LM's own image encoder (shared, not copied: the encoder keeps
    what it learns; the head and text tower are dropped after the stage). Parts: encoder,
    projection (the pooled head and the learned temperature/bias), text. The loss is the
    module's `contrastive.loss` (clip or siglip); it counts pairs.
    """

    unit = "pairs"
    skip_reason = "not one image with an answer"

    def __init__(self, stage: StageConfig, model: nn.Module):
        self.check(stage)
        self.stage = stage
        self.module = model if isinstance(model, DualEncoder) else self._around(model)
        self.placeholder = self.module.image_placeholder
        self.features = FeatureCache() if stage.cache_features else None

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        """Options of the LM's loss are refused; the contrastive options get their defaults."""
        stage.contrastive = stage.contrastive or ContrastiveConfig()
        # (`validation:` needs summed_loss, which this objective lacks: StageConfig refuses it)
        refuse_lm_loss_options(stage)
        refuse_answered_data(stage)

    def _around(self, model: nn.Module) -> DualEncoder:
        if model.encoder is None:
            raise UserError(f"stage {self.stage.name!r}: a contrastive stage needs an image encoder")
        torch.manual_seed(self.stage.seed)  # the new head starts the same every run
        return DualEncoder.around(model.encoder, self.stage.contrastive)

    # ------------------------------------------------------------ data

    def example(self, sample, memo: dict) -> dict | None:
        """An (image, text) pair: the sample's one medium and its last assistant message."""
        replies = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        if len(sample.images) != 1 or not replies:
            return None
        return {"image": sample.images[0], "text": replies[-1]}

    def batch(self, examples: list[dict]) -> PairBatch:
        """Pairs -> a `PairBatch`: the encoder's inputs (pixels, or log-mel for audio) or,
        while the encoder is frozen, its cached outputs."""
        texts = [e["text"] for e in examples]
        paths = [e["image"] for e in examples]
        batch = PairBatch(texts=texts, text_ids=torch.tensor([text_id(t) for t in texts]))
        encoder = self.module.encoder
        if self.features is not None and encoder_is_frozen(encoder):
            batch.features = self.features.get("image", encoder, self._load, paths)  # [B, S, D_enc]
        else:
            batch.media = self._load(paths)
        return batch

    def _load(self, paths: list) -> torch.Tensor:
        """Files -> the encoder's input batch [B, ...] (the encoder loads its own medium)."""
        return torch.stack([self.module.encoder.load_media(path) for path in paths])

    # ------------------------------------------------------------ loss

    def loss(self, forward: nn.Module, batch: PairBatch) -> StepLoss:
        pairs = forward(batch)
        if self.module.config.loss == "siglip":
            loss = siglip_loss(pairs.image, pairs.text, pairs.logit_scale, pairs.logit_bias, pairs.positives)
        else:
            loss = clip_loss(pairs.image, pairs.text, pairs.logit_scale, pairs.positives)
        return StepLoss(loss, batch.num_pairs)  # this process's pairs (the loop sums processes)
