"""DualEncoder: an image tower and a text tower trained into one embedding space.

Example (the contrastive stage of a recipe builds one around its model's encoder):
    dual = DualEncoder.around(model.encoder, ContrastiveConfig(pool="max"))
    pairs = dual(PairBatch(texts, text_ids, media=pixels))  # embeddings; the loss: objectives.contrastive
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polymodal.config import ContrastiveConfig, ModelConfig, RecipeConfig
from polymodal.contrastive.gather import gather_rows
from polymodal.contrastive.towers import ImageTower, TextTower
from polymodal.encoders.base import Encoder, build_encoder
from polymodal.errors import UserError
from polymodal.processing.batch import PairBatch
from polymodal.registry import register_model_kind
from polymodal.safe_files import build_checked
from polymodal.saved import (
    load_saved_tokenizer,
    load_saved_weights,
    read_model_config,
    write_model_files,
)
from polymodal.sources import PartLoader

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: the temperature never drops below 0.01


@dataclass
class PairEmbeddings:
    """What the forward gives the contrastive objective, over the global batch (every
    process's rows under DDP: contrastive/gather.py): image [B, D] and text [B, D]
    embeddings, L2-normalised, row i a pair; text_ids [B] (equal ids: positives of each
    other); logit_scale, the clamped log inverse temperature; logit_bias (SigLIP) or None."""

    image: torch.Tensor
    text: torch.Tensor
    text_ids: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    @property
    def positives(self) -> torch.Tensor:
        """[B, B] bool: which texts match which image (equal captions match)."""
        return self.text_ids[:, None] == self.text_ids[None, :]


class LogitParameters(nn.Module):
    """The learned log inverse temperature (and SigLIP's bias); they train with `projection`."""

    def __init__(self, config: ContrastiveConfig):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))
        # SigLIP starts the bias at -10 so that the many negatives do not swamp the first steps.
        self.bias = nn.Parameter(torch.tensor(-10.0)) if config.loss == "siglip" else None


@register_model_kind("dual-encoder", config=ModelConfig)
class DualEncoder(nn.Module):
    """A CLIP-style dual encoder: a media tower and a text tower embedding into one space.

    Parts: `encoder` (the image encoder, or an audio one such as `whisper`: the
    "image" side is whatever medium the encoder reads), `projection` (its pooled head and
    the learned temperature/bias), `text` (the text tower, with its projection if any)."""

    image_placeholder = "<image>"

    def __init__(self, encoder: Encoder, text: TextTower, config: ContrastiveConfig):
        super().__init__()
        self.config = config
        self.image = ImageTower(encoder, text.dim, config.pool)
        self.text = text
        self.logits = LogitParameters(config)
        self.model_config: ModelConfig | None = None  # set when built from a model config
        self.architectures: dict = {}

    @classmethod
    def around(cls, encoder: Encoder, config: ContrastiveConfig, loader: PartLoader | None = None,
               tokenizer=None) -> DualEncoder:
        """A dual encoder whose image side is `encoder` itself (shared, not copied)."""
        loader = loader or PartLoader()
        model, loaded_tokenizer = loader.text_encoder("text", config.text)
        return cls(encoder, TextTower(model, tokenizer or loaded_tokenizer, config.dim), config)

    @classmethod
    def from_config(cls, config: ModelConfig | RecipeConfig, loader: PartLoader | None = None,
                    tokenizer=None) -> DualEncoder:
        """A `kind: dual-encoder` model: its encoder built (or loaded) as configured, its
        text tower loaded from `contrastive.text`."""
        config = config.model if isinstance(config, RecipeConfig) else config
        if config.kind != "dual-encoder":
            # build.build_model / load_model dispatch by kind: another kind here is a caller's bug
            raise RuntimeError(f"model.kind {config.kind!r} is not a dual encoder")
        loader = loader or PartLoader()
        model = cls.around(build_encoder(config.encoder, loader), config.contrastive, loader, tokenizer)
        model.model_config, model.architectures = config, loader.architectures
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json, model.safetensors (both towers) and the text tokenizer in `text/`;
        the folder is complete: loading it needs no source."""
        if self.model_config is None:
            raise UserError("only a dual-encoder built from a model config can be saved")
        directory = Path(directory)
        write_model_files(directory, self, self.model_config, self.architectures)
        self.text.tokenizer.save_pretrained(directory / "text")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DualEncoder:
        """A saved dual encoder. Raises UserError naming the file for a missing, damaged or
        mismatched file (checked before the model is allocated; see polymodal.safe_files)."""
        directory = Path(directory)
        record, config = read_model_config(directory)
        tokenizer = load_saved_tokenizer(directory / "text")
        model = build_checked(
            lambda: cls.from_config(config, PartLoader(architectures=record["architectures"]), tokenizer),
            directory, record)
        load_saved_weights(model, directory)
        return model.eval()

    # ------------------------------------------------------------ freezing

    def part_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.image.encoder, "projection": nn.ModuleList([self.image.head, self.logits]),
                "text": self.text}

    def decoder_layers(self) -> list[nn.Module]:
        """None: a dual encoder has no LLM decoder for `compile: true` to compile."""
        return []

    def set_trainable(self, parts: list[str]) -> None:
        known = list(self.part_modules())
        unknown = [part for part in parts if part not in known]
        if unknown:
            raise UserError(f"unknown trainable part {unknown[0]!r} in a contrastive stage; "
                            f"known: {', '.join(known)}")
        for name, module in self.part_modules().items():
            module.requires_grad_(name in parts)

    # ------------------------------------------------------------ forward

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, D], L2-normalised."""
        return self.image(pixels)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> [B, D], L2-normalised."""
        return self.text(texts)

    def forward(self, batch: PairBatch) -> PairEmbeddings:
        """Both towers' embeddings of the global batch (see gather.py for DDP); the loss is
        the objective's (`objectives.contrastive`, `contrastive.losses`)."""
        if batch.features is not None:  # cached outputs of a frozen encoder
            image = self.image.head(batch.features)  # [B, D]
        else:
            image = self.encode_images(batch.media)  # [B, D]
        # The scale and bias leave the forward as results computed in it (never the
        # parameters themselves), so a sharded module frees nothing they still point to.
        bias = self.logits.bias.clone() if self.logits.bias is not None else None
        return PairEmbeddings(image=gather_rows(image), text=gather_rows(self.encode_texts(batch.texts)),
                              text_ids=gather_rows(batch.text_ids),
                              logit_scale=self.logits.scale.clamp(max=MAX_LOGIT_SCALE), logit_bias=bias)

    @property
    def encoder(self) -> Encoder:
        return self.image.encoder
