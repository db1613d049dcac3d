"""MultimodalLM: encoder -> connector -> fusion -> LLM, with a loss only where labels exist."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import ModelConfig, RecipeConfig
from polymodal.connectors import build_connector
from polymodal.encoders import build_encoder
from polymodal.errors import UserError
from polymodal.fusion import build_fusion
from polymodal.llm import LanguageModel
from polymodal.processing import Processor
from polymodal.processing.branches import branch_attention_mask
from polymodal.processing.collate import IGNORE, collate
from polymodal.registry import register_model_kind
from polymodal.safe_files import build_checked
from polymodal.saved import (
    load_saved_tokenizer,
    load_saved_weights,
    read_model_config,
    write_model_files,
)
from polymodal.sources import PartLoader


@dataclass
class Output:
    loss: torch.Tensor  # mean cross-entropy over label positions
    num_label_tokens: int


@register_model_kind("multimodal-lm", config=ModelConfig)
class MultimodalLM(nn.Module):
    """A decoder LLM that reads images through an encoder and a connector.

    Example:
        model = MultimodalLM.from_config(load_recipe("recipes/tiny-llava.yaml").model)
        batch = collate([model.processor.encode_for_training(messages, [image])], model.pad_id)
        loss = model(batch).loss
    """

    def __init__(self, config: ModelConfig, loader: PartLoader | None = None, tokenizer=None):
        super().__init__()
        if config.kind != "multimodal-lm":
            raise UserError(f"model.kind {config.kind!r} is not a multimodal LM")
        loader = loader or PartLoader(trust_remote_code=config.llm.trust_remote_code)
        self.config = config
        self.llm = LanguageModel(config.llm, loader, tokenizer)
        self.encoder = build_encoder(config.encoder, loader) if config.encoder else None
        self.connector = None
        if self.encoder is not None:
            self.connector = build_connector(
                config.connector, self.encoder.out_dim, self.llm.hidden_size, self.encoder.num_tokens
            )
        self.fusion = build_fusion(config.fusion)
        self.architectures = loader.architectures  # what save_pretrained records per part
        self.processor = Processor(
            self.llm,
            tokens_per_image=self.connector.num_tokens if self.connector else None,
            image_size=self.encoder.image_size if self.encoder else None,
        )

    @classmethod
    def from_config(cls, config: ModelConfig | RecipeConfig) -> MultimodalLM:
        """Build from a config, loading each part's pretrained weights from its source."""
        return cls(config.model if isinstance(config, RecipeConfig) else config)

    @property
    def pad_id(self) -> int:
        return self.llm.tokenizer.pad_token_id

    @property
    def tokens_per_image(self) -> int | None:
        return self.processor.tokens_per_image

    # ------------------------------------------------------------ freezing

    def part_modules(self) -> dict[str, nn.Module | None]:
        return {"encoder": self.encoder, "connector": self.connector, "llm": self.llm}

    def set_trainable(self, parts: list[str]) -> None:
        """Train exactly these parts and freeze the rest; the one place freezing happens.

        Parts: `encoder`, `connector`, `llm` (all of it), `llm.lora` (the adapters only).
        """
        known = ["encoder", "connector", "llm", "llm.lora"]
        unknown = [part for part in parts if part not in known]
        if unknown:
            raise UserError(f"unknown trainable part {unknown[0]!r}; known: {', '.join(known)}")
        if "llm.lora" in parts and self.config.llm.lora is None:
            raise UserError("llm.lora is trainable but model.llm.lora is not configured")
        for name, module in self.part_modules().items():
            if module is not None:
                module.requires_grad_(name in parts)
        if "llm.lora" in parts and "llm" not in parts:
            for name, parameter in self.llm.named_parameters():
                parameter.requires_grad_("lora_" in name)

    # ------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> LLM tokens [N, K, D_llm]."""
        if self.encoder is None:
            raise UserError("this model has no image encoder; it takes text only")
        return self.connector(self.encoder(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_tokens: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] (+ images) -> input embeddings [B, T, D] with image tokens fused in.

        Images come as pixels [N, 3, S, S], as encoder features [N, S_enc, D_enc] (a cache
        of a frozen encoder), or as finished LLM tokens [N, K, D].
        """
        if image_tokens is None and image_features is not None:
            image_tokens = self.connector(image_features)
        if image_tokens is None and pixel_values is not None:
            image_tokens = self.encode_images(pixel_values)
        text = self.llm.embed(input_ids)
        return self.fusion(text, input_ids == self.llm.image_token_id, image_tokens)

    def forward(self, batch: dict) -> Output:
        """Mean next-token loss over label positions; logits are computed only there."""
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("image_tokens"),
                            batch.get("image_features"))
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if "branch_ids" in batch:  # rows holding a shared prefix and its branches
            mask = branch_attention_mask(batch["branch_ids"], mask)  # [B, 1, T, T]
            positions = batch["position_ids"]
        hidden = self.llm.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # [B, T, D]
        targets = batch["labels"][:, 1:]  # token t+1 is predicted at position t
        keep = targets != IGNORE
        logits = self.llm.lm_head(hidden[:, :-1][keep])  # [N_labels, V], nothing else
        if "sample_ids" not in batch:
            loss = F.cross_entropy(logits.float(), targets[keep])
            return Output(loss=loss, num_label_tokens=int(keep.sum()))
        # Each sample's mean, then the mean over samples: a 14-token answer counts as much
        # as a 1-token one (stage option loss_average: sample).
        per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # [N_labels]
        _, sample = batch["sample_ids"][:, 1:][keep].unique(return_inverse=True)  # [N_labels]
        sums = per_token.new_zeros(int(sample.max()) + 1).index_add(0, sample, per_token)
        counts = per_token.new_zeros(sums.shape).index_add(0, sample, torch.ones_like(per_token))
        return Output(loss=(sums / counts).mean(), num_label_tokens=int(keep.sum()))

    # ------------------------------------------------------------ training data

    @property
    def image_placeholder(self) -> str:
        return self.llm.image_token

    def training_example(self, sample, max_length: int | None = None, memo: dict | None = None) -> dict | None:
        """A `data.formats.Sample` -> {input_ids, labels, images: paths}; None when it is
        longer than `max_length` (or the LLM's context): whole samples are skipped, never
        cut inside an image's tokens.

        `memo` (a dict kept across one dataset's samples) tokenizes each distinct conversation
        text once: the tokens depend on the text, not on which image fills a placeholder, and
        easy-VQA asks the same few hundred questions of 4,000 images. Examples from the memo
        share their id and label lists, which nothing downstream modifies.
        """
        limit = min(max_length or self.llm.max_length, self.llm.max_length)
        memo = {} if memo is None else memo
        key = (json.dumps(sample.messages), len(sample.images))
        if key not in memo:
            memo[key] = self.processor.encode_for_training(sample.messages, [None] * len(sample.images),
                                                           load_images=False)
        tokens = memo[key]
        if len(tokens["input_ids"]) > limit:
            return None
        return {"input_ids": tokens["input_ids"], "labels": tokens["labels"], "images": sample.images}

    def training_batch(self, examples: list[dict], features=None) -> dict:
        """Examples -> a padded batch with their images loaded, or their encoder features
        from `features` (a `train.mixture.FeatureCache`) when the encoder is frozen."""
        rows = [{**e, "pixel_values": self.processor.pixels(e["images"]) if features is None else None}
                for e in examples]
        batch = collate(rows, self.pad_id)
        paths = [path for e in examples for path in e["images"]]
        if features is not None and paths:
            batch["image_features"] = features.get(self, paths)
        return batch

    # ------------------------------------------------------------ files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and the tokenizer files; each file atomically."""
        directory = Path(directory)
        write_model_files(directory, self, self.config, self.architectures)
        self.llm.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MultimodalLM:
        """Rebuild a saved model: architectures from config.json, weights from model.safetensors.
        Raises UserError naming the file for a missing, damaged or mismatched file (checked
        before the model is allocated; see polymodal.safe_files)."""
        directory = Path(directory)
        record, config = read_model_config(directory)
        tokenizer = load_saved_tokenizer(directory)
        model = build_checked(lambda: cls(config, PartLoader(architectures=record["architectures"]), tokenizer),
                              directory, record)
        load_saved_weights(model, directory)
        return model.eval()
