"""`objective: lm`: the next-token loss on the assistant's tokens of conversations with media
(LLaVA's visual instruction tuning, and its alignment stage on captions)."""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
from torch import nn

from polymodal.config import StageConfig
from polymodal.errors import ConfigError, UserError
from polymodal.image_generation.flow_head import DRAWN_LATENTS
from polymodal.llm import merged_lora
from polymodal.model import MultimodalLM
from polymodal.objectives.base import StepLoss, encoder_is_frozen, part_groups
from polymodal.objectives.features import FeatureCache
from polymodal.objectives.losses import next_token_loss, summed_next_token_loss
from polymodal.processing.batch import Batch
from polymodal.processing.branches import balanced_rows, merge_branches
from polymodal.processing.collate import IGNORE, collate
from polymodal.processing.images import load_image
from polymodal.registry import register_objective


@register_objective("lm")
class LanguageModeling:
    """Next-token cross-entropy on assistant tokens; a stage trains the multimodal LM itself.

    Options it reads: `max_length` (longer samples are skipped whole, never cut inside a
    medium's tokens), `share_prefix` (rows of samples over one copy of their common prefix:
    processing/branches.py), `loss_average` (token or sample: objectives/losses.py),
    `lora_plus_ratio`, `cache_features` (a frozen encoder's outputs computed once).
    """

    unit = "tokens"

    def __init__(self, stage: StageConfig, model: nn.Module):
        self.check(stage)
        if not isinstance(model, MultimodalLM):
            raise UserError(f"stage {stage.name!r}: objective lm trains a multimodal LM; "
                            "a dual-encoder model trains with objective: contrastive")
        self.stage, self.module = stage, model
        self.placeholder = model.image_placeholder
        self.features = FeatureCache() if stage.cache_features else None
        limit = stage.max_length
        self.skip_reason = f"longer than max_length {limit}" if limit else "longer than the LLM's context"

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        if stage.share_prefix is not None and stage.share_prefix < 2:
            raise ConfigError(f"share_prefix: at least 2 samples a row, got {stage.share_prefix}")

    # ------------------------------------------------------------ parts

    def set_trainable(self, module: nn.Module) -> None:
        module.set_trainable(self.stage.train)

    def parameter_groups(self, module: nn.Module) -> list[dict]:
        """One group (and learning rate) per trained part; with LoRA+ the adapters' B
        matrices get their own."""
        groups = []
        for part, params in part_groups(module, self.stage):
            if part == "llm.lora" and self.stage.lora_plus_ratio:
                groups += lora_plus_groups(module, params, self.stage.lr[part], self.stage.lora_plus_ratio)
            elif params:
                groups.append({"params": params, "lr": self.stage.lr[part], "name": part})
        return groups

    def stage_context(self):
        """When the stage trains neither the LLM nor its LoRA adapters (an align stage),
        the adapters are folded into the base weights for its duration and restored exactly
        after (`llm.merged_lora`): the LLM computes the same function without running the
        adapters' matmuls at every step. Fresh adapters (B = 0) fold in as exact zeros."""
        if {"llm", "llm.lora"} & set(self.stage.train):
            return nullcontext()
        return merged_lora(self.module.llm.model)

    # ------------------------------------------------------------ data

    def example(self, sample, memo: dict) -> dict | None:
        """A `Sample` -> {input_ids, labels, images: paths}; None when it is longer than
        `max_length` (or the LLM's context).

        `memo` tokenizes each distinct conversation text once: the tokens depend on the
        text, not on which image fills a placeholder, and easy-VQA asks the same few hundred
        questions of 4,000 images. Examples from the memo share their id and label lists,
        which nothing downstream modifies.
        """
        return lm_example(self.module, sample, self.stage.max_length, memo)

    def batch(self, examples: list[dict]) -> Batch:
        """Examples -> a `Batch`: rows of shared prefixes when the stage says so, each
        modality's media loaded, or a frozen encoder's features from the cache."""
        module = self.module
        if self.stage.share_prefix:
            # Kind flow's drawings stay rows of their own, after the others: their latent
            # positions all have one id, so a common prefix would merge unlike latents.
            drawings = [example for example in examples if DRAWN_LATENTS in example.get("media", {})]
            examples = [example for example in examples if DRAWN_LATENTS not in example.get("media", {})]
            others = [token for modality, token in module.placeholder_ids.items() if modality != "image"]
            examples = [merge_branches(row, module.llm.image_token_id, module.tokens_per_image or 1, others)
                        for row in balanced_rows(examples, self.stage.share_prefix)] + drawings
        batch = collate(examples, module.pad_id)
        for modality in module.modalities:
            paths = [path for example in examples for path in example_media(example, modality)]
            if paths:
                self._add_media(batch, modality, paths)
        return batch

    def _add_media(self, batch: Batch, modality: str, paths: list[str]) -> None:
        """One modality's media of the batch: loaded, or a frozen encoder's cached features."""
        module = self.module
        encoder = module.encoders[modality]

        def load(items: list) -> torch.Tensor:
            return module.processor.media_inputs({modality: items})[modality]

        if self.features is not None and encoder_is_frozen(encoder):
            batch.media_features[modality] = self.features.get(modality, encoder, load, paths)
        else:
            batch.media[modality] = load(paths)

    # ------------------------------------------------------------ loss

    def loss(self, forward: nn.Module, batch: Batch) -> StepLoss:
        sample_ids = batch.sample_ids if self.stage.loss_average == "sample" else None
        return StepLoss(next_token_loss(forward(batch), sample_ids), batch.num_tokens)

    def summed_loss(self, batch: Batch) -> tuple[float, int]:
        """(summed loss, label tokens) of the module on a batch: a held-out loss per token."""
        return summed_next_token_loss(self.module(batch))


def lm_example(model: MultimodalLM, sample, max_length: int | None = None, memo: dict | None = None) -> dict | None:
    """A `Sample` -> {input_ids, labels, images: paths} for `model`, or None when longer than
    `max_length` (or the LLM's context); see `LanguageModeling.example`."""
    limit = min(max_length or model.llm.max_length, model.llm.max_length)
    memo = {} if memo is None else memo
    counts = {modality: len(paths) for modality, paths in sample.media.items()}
    key = (json.dumps(sample.messages), len(sample.images), json.dumps(counts))
    if key not in memo:
        memo[key] = model.processor.encode_for_training(
            sample.messages, [None] * len(sample.images), load_images=False,
            media={modality: [None] * count for modality, count in counts.items()})
    tokens = memo[key]
    if sample.draws:
        tokens = drawing_tokens(model, tokens, sample.draws)
    if len(tokens["input_ids"]) > limit:
        return None
    example = {"input_ids": tokens["input_ids"], "labels": tokens["labels"], "images": sample.images}
    if sample.media:  # other modalities' paths (an image-only example stays as it was)
        example["media_paths"] = sample.media
    if DRAWN_LATENTS in tokens:  # kind flow: collate gathers them into Batch.media
        example["media"] = {DRAWN_LATENTS: tokens[DRAWN_LATENTS]}
    return example


def drawing_tokens(model: MultimodalLM, tokens: dict, draws: list[str]) -> dict:
    """A drawing sample's ids and labels: the image the assistant draws, as its block of codes
    [<begin_of_image>, K codes, <end_of_image>] (`image_generation.codes`), starts the last
    answer. The codes come from the model's frozen tokenizer (trained by an earlier stage);
    `<end_of_image>` is not a label, as the sampler always writes it after the K-th code.
    Kind flow (`image_generation.flow_head`): the block is [<begin_of_image>, K latent
    positions, <end_of_image>] and the tokenizer's latents [1, K, d] go with it
    (`DRAWN_LATENTS`), for the positions' inputs and the flow head's targets.

    Raises:
        UserError: the model does not draw, or the sample draws more than one image.
    """
    codes, flow = model.image_codes, model.image_flow
    if codes is None and flow is None:
        raise UserError("a drawing sample (an image in the answer) needs a model that draws "
                        "(model.image_output)")
    if len(draws) != 1:
        raise UserError(f"a drawing sample draws one image, this one {len(draws)}")
    pixels = load_image(draws[0], model.image_tokenizer.image_size)[None]
    drawn = {}
    with torch.no_grad():
        if flow is not None:
            drawn[DRAWN_LATENTS] = model.image_tokenizer.encode_latents(pixels).float()  # [1, K, d]
            block = flow.block()
        else:
            block = codes.block(model.image_tokenizer.encode(pixels)[0].tolist())  # K codes
    ids, labels = list(tokens["input_ids"]), list(tokens["labels"])  # the memo's may be packed arrays
    start = max((i for i, label in enumerate(labels) if label == IGNORE), default=-1) + 1  # the last answer
    return {"input_ids": ids[:start] + block + ids[start:],
            "labels": labels[:start] + block[:-1] + [IGNORE] + labels[start:], **drawn}


def example_media(example: dict, modality: str) -> list[str]:
    """An example's media paths of one modality, in placeholder order."""
    return example["images"] if modality == "image" else example.get("media_paths", {}).get(modality, [])


def lora_plus_groups(model: MultimodalLM, params: list, lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): the adapters' A matrices at `lr`, their B matrices (zero
    at the start) at `ratio` x `lr`."""
    b_ids = {id(p) for name, p in model.llm.named_parameters() if "lora_B" in name or "lora_embedding_B" in name}
    a_part = [p for p in params if id(p) not in b_ids]
    b_part = [p for p in params if id(p) in b_ids]
    return [group for group in ({"params": a_part, "lr": lr, "name": "llm.lora"},
                                {"params": b_part, "lr": lr * ratio, "name": "llm.lora.B"}) if group["params"]]
