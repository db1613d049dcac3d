"""A stage's data: every dataset read, checked and tokenized once, then drawn by weight."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from polymodal.config import DatasetConfig, StageConfig
from polymodal.data.formats import (
    Sample,
    read_captions,
    read_easy_vqa,
    read_easy_vqa_captions,
    read_llava_json,
    split_turns,
)
from polymodal.data.replay import answer_questions, read_questions
from polymodal.data.validate import check_samples
from polymodal.processing.branches import merge_branches, sample_ids
from polymodal.train.distributed import module_device


def read_dataset(config: DatasetConfig) -> list[Sample]:
    if config.format == "easy-vqa":
        samples = read_easy_vqa(config.split or "train", config.path, config.flip_yes_no,
                                config.question_types)
    elif config.format == "easy-vqa-captions":
        samples = read_easy_vqa_captions(config.split or "train", config.path)
    elif config.format == "easy-vqa-speech":
        from polymodal.data.speech import read_easy_vqa_speech

        samples = read_easy_vqa_speech(config.split or "train", config.path)
    elif config.format == "replay":
        samples = read_questions(config.path)  # answered in encode_dataset, by the model
    elif config.format == "llava":
        samples = read_llava_json(config.path, config.image_folder)
    else:
        samples = read_captions(config.path, config.image_folder)
    samples = samples[: config.limit] if config.limit else samples
    if config.turns is not None:
        samples = [part for sample in samples for part in split_turns(sample, config.turns)]
    return samples


@dataclass
class EncodedDataset:
    name: str
    weight: float
    samples: list[dict]  # the model's training examples, e.g. {input_ids, labels, images: paths}
    skipped_too_long: int


def encode_dataset(model, config: DatasetConfig, stage: StageConfig, bad_file: Path | None,
                   replay_file: Path | None = None) -> EncodedDataset:
    """Read, check (bad samples to `bad_file`) and tokenize; images stay paths until batching.
    A replay dataset's answers are the model's own, kept in (or taken from) `replay_file`."""
    name = config.path or (config.format if config.format == "replay" else f"easy-vqa/{config.split or 'train'}")
    samples = read_dataset(config)
    if config.format == "replay":
        samples = answer_questions(model, samples, config.max_new_tokens, replay_file)
    samples = check_samples(samples, model.image_placeholder, bad_file, stage.max_bad_fraction, name)
    encoded, unusable, memo = [], 0, {}
    for sample in samples:
        example = model.training_example(sample, stage.max_length, memo)
        if example is None:
            unusable += 1  # e.g. too long: whole samples are skipped, never cut inside an image
            continue
        encoded.append(example)
    return EncodedDataset(name, config.weight, encoded, unusable)


class Mixture:
    """Batches drawn from several datasets by weight; the order is fixed by the seed.

    The draw for optimizer step `s` depends only on (seed, s), so a run resumed at step
    `s` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, datasets: list[EncodedDataset], batch_size: int, seed: int,
                 features: FeatureCache | None = None, share_prefix: int | None = None,
                 loss_average: str = "token"):
        self.datasets = [d for d in datasets if d.samples]
        self.features = features
        self.weights = torch.tensor([d.weight for d in self.datasets], dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.share_prefix = share_prefix
        self.loss_average = loss_average

    def __len__(self) -> int:
        return sum(len(d.samples) for d in self.datasets)

    def batch(self, model, step: int, micro: int = 0, rank: int = 0, world_size: int = 1) -> dict:
        """The batch of (step, micro); under DDP, this process's rows of the global batch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 997 + micro)
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator)
        chosen = []
        for index in which.tolist():
            samples = self.datasets[index].samples
            chosen.append(samples[int(torch.randint(len(samples), (1,), generator=generator))])
        mine = chosen[rank::world_size]
        if self.share_prefix:  # rows of several samples over one copy of their common prefix
            mine = [merge_branches(row, model.llm.image_token_id, model.tokens_per_image or 1)
                    for row in balanced_rows(mine, self.share_prefix)]
        batch = model.training_batch(mine, self.features)
        if self.loss_average == "sample":  # the model averages per sample, then over samples
            batch["sample_ids"] = sample_ids(batch)
        return batch


def balanced_rows(examples: list[dict], per_row: int) -> list[list[dict]]:
    """Up to `per_row` examples per row, the longest placed first, each in the row with the
    fewest tokens so far: rows pad to the longest, and one long sample (a replay answer)
    would otherwise pad every other row to its length. Rows keep the draw's order inside."""
    count = -(-len(examples) // per_row)
    rows, lengths = [[] for _ in range(count)], [0] * count
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for index in by_length:
        row = min((r for r in range(count) if len(rows[r]) < per_row), key=lengths.__getitem__)
        rows[row].append(index)
        lengths[row] += len(examples[index]["input_ids"])
    return [[examples[i] for i in sorted(row)] for row in rows]


class FeatureCache:
    """Encoder features of each image, computed once, for stages that keep the encoder frozen.

    Held in memory: [S_enc, D_enc] float32 per image (a 64-token, 192-wide ViT: 48 KiB).
    """

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, model, paths: list[str]) -> torch.Tensor:
        """[N, S_enc, D_enc] for these image paths, encoding only those not seen before."""
        missing = list(dict.fromkeys(p for p in paths if p not in self.features))
        if missing:
            was_training = model.encoder.training
            model.encoder.eval()
            inputs = model.media_inputs(missing) if hasattr(model, "media_inputs") else model.processor.pixels(missing)
            encoded = model.encoder(inputs.to(module_device(model.encoder)))
            model.encoder.train(was_training)
            self.features.update(zip(missing, encoded))
        return torch.stack([self.features[p] for p in paths])
