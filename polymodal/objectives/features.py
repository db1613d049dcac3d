"""Encoder outputs computed once, for stages that keep an encoder frozen."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn

from polymodal.objectives.base import module_device


class FeatureCache:
    """Each medium's encoder outputs, computed once, keyed by (modality, item).

    A frozen encoder gives a medium the same features at every step, so a stage encodes
    each image (or clip) once instead of at every draw. Held in memory: [S_enc, D_enc]
    float32 per item (a 64-token, 192-wide ViT: 48 KiB). Computed in eval mode (no
    dropout), as a frozen encoder runs.
    """

    def __init__(self):
        self.features: dict[tuple[str, Hashable], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, modality: str, encoder: nn.Module, load: Callable[[list], torch.Tensor],
            items: list) -> torch.Tensor:
        """[N, S_enc, D_enc] for these items (media paths), encoding only those not seen before.

        Args:
            modality: "image", "audio", ...: the cache's key with each item.
            encoder: the frozen encoder of that modality.
            load: items -> the encoder's input batch [M, ...] (pixels, log-mel).
            items: the media, in the batch's placeholder order (repeats allowed).
        """
        missing = list(dict.fromkeys(item for item in items if (modality, item) not in self.features))
        if missing:
            was_training = encoder.training
            encoder.eval()
            encoded = encoder(load(missing).to(module_device(encoder)))
            encoder.train(was_training)
            self.features.update(((modality, item), features) for item, features in zip(missing, encoded))
        return torch.stack([self.features[modality, item] for item in items])
