"""A stage's data: every dataset read, checked and tokenized once, then drawn by weight."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from polymodal.config import DatasetConfig
from polymodal.data.datasets import format_options, read_dataset
from polymodal.data.sample import Sample
from polymodal.data.validate import check_samples, record_bad, stop_if_too_many
from polymodal.errors import UserError
from polymodal.objectives.base import Objective
from polymodal.train.replay import answer_questions


def pack(value, packed: dict[int, array]):
    """A list of ints as an int32 array (the one in `packed` if this list has one); any
    other value as it is. `packed` must not outlive the lists it names (ids are reused)."""
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        return value
    if id(value) not in packed:
        try:
            packed[id(value)] = array("i", value)
        except (TypeError, OverflowError):  # not all ints of 32 bits: kept as given
            return value
    return packed[id(value)]


class Examples(Sequence):
    """A dataset's training examples, held compactly; each read gives back the plain dict.

    A list of token ids is held as an int32 array: 4 bytes a token, where a Python list
    holds an 8-byte pointer to a 28-byte int object (the 195,000 records of a 50 MB LLaVA
    file held ~1 GB of such lists). Lists the tokenizer memo shares stay shared.
    """

    def __init__(self):
        self.rows: list[dict] = []

    def append(self, example: dict, packed: dict[int, array] | None = None) -> None:
        """`packed`: id(list) -> its array, for lists packed already (the memo's)."""
        packed = {} if packed is None else packed
        self.rows.append({key: pack(value, packed) for key, value in example.items()})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {key: value.tolist() if isinstance(value, array) else value
                for key, value in self.rows[index].items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


@dataclass
class EncodedDataset:
    name: str
    weight: float
    samples: Examples  # the model's training examples, e.g. {input_ids, labels, images: paths}
    skipped_too_long: int
    fingerprint: dict[str, str] = field(default_factory=dict)  # see `fingerprint`


# Files up to this size are hashed whole; bigger ones (long audio, a big JSON) by their size
# and their first and last FINGERPRINT_PART bytes, which catches a replaced, truncated or
# extended file without reading gigabytes at every start (an edit inside that keeps the size
# is missed).
FINGERPRINT_WHOLE = 8 << 20
FINGERPRINT_PART = 1 << 20
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime): the stages share images


def file_digest(path: str) -> str:
    """sha256 (hex, first 16 digits) of a file's bytes, or of its size and ends if it is big."""
    try:
        status = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(status.st_mode):  # a folder, FIFO or device: never opened (it may block)
        return "not a file"
    key = (path, status.st_size, status.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if status.st_size <= FINGERPRINT_WHOLE:
                digest.update(handle.read())
            else:
                digest.update(str(status.st_size).encode() + handle.read(FINGERPRINT_PART))
                handle.seek(-FINGERPRINT_PART, os.SEEK_END)
                digest.update(handle.read())
        _FILE_DIGESTS[key] = digest.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def fingerprint(name: str, samples: list[Sample]) -> dict[str, str]:
    """What a resumed run must see again to be bit-identical: the samples as read (ids,
    turns, media paths; so the data file's formatting does not matter, and easy-VQA's
    package files count too), under the dataset's `name`, and each media file's bytes."""
    records = hashlib.sha256()
    for sample in samples:
        record = [sample.id, sample.messages, sample.images] + ([sample.media] if sample.media else []) \
            + ([sample.draws] if sample.draws else [])
        records.update(json.dumps(record).encode() + b"\n")
    media = dict.fromkeys(path for sample in samples for path in sample.media_paths())
    return {name: records.hexdigest()[:16], **{path: file_digest(path) for path in media}}


def encode_dataset(objective: Objective, config: DatasetConfig, bad_file: Path | None,
                   replay_file: Path | None = None, fingerprinted: bool = False) -> EncodedDataset:
    """Read, check and make the objective's examples (`objective.example`); media stay
    paths until batching. Samples that are bad or unusable (too long) are skipped, listed
    in `bad_file` (rank 0's; None elsewhere) and counted on the console; more than the
    stage's `max_bad_fraction` of them (both kinds together) stops the run. A replay dataset's answers are the stage's model's own
    (`train.replay`), kept in (or taken from) `replay_file`. `fingerprinted`: also the
    data's `fingerprint`."""
    stage, model = objective.stage, objective.module
    config = format_options(config)  # the format's own options (replay's max_new_tokens)
    name = config.name
    samples = read_dataset(config)
    prints = fingerprint(name, samples) if fingerprinted else {}
    if config.answered_by_model:
        samples = answer_questions(model, samples, config.max_new_tokens, replay_file)
    total = len(samples)
    samples = check_samples(samples, objective.placeholder, bad_file, stage.max_bad_fraction, name)
    bad = total - len(samples)
    encoded, too_long, refused, memo = Examples(), [], [], {}
    reason = objective.skip_reason
    for sample in tqdm(samples, desc=f"encoding {name}", unit="sample", dynamic_ncols=True,
                       leave=False, disable=bad_file is None):
        known = len(memo)
        try:
            example = objective.example(sample, memo)
        except UserError as error:  # e.g. a chat template that refuses this conversation
            refused.append({"id": sample.id, "reason": str(error)})
            continue
        packed = {}  # for this sample only, while its lists are alive
        if len(memo) > known and isinstance(memo[key := next(reversed(memo))], dict):
            # a text tokenized just now: its memo entry holds the arrays from here on, so the
            # lists are freed as encoding goes (else all of them stay until the end)
            memo[key] = {name: pack(value, packed) for name, value in memo[key].items()}
        if example is None:
            too_long.append({"id": sample.id, "reason": reason})  # whole samples, never cut
            continue
        encoded.append(example, packed)
    record_bad(bad_file, name, refused + too_long)
    bad += len(refused)
    if (bad or too_long) and bad_file is not None:
        print(f"{name}: skipped {bad + len(too_long)} of {total} samples ({bad} bad, {len(too_long)} "
              f"{reason}); listed in {bad_file}", file=sys.stderr)
    # the same threshold for both kinds: a sample skipped for its length is as lost as a bad one
    stop_if_too_many(refused + too_long, total, stage.max_bad_fraction, name, bad_file,
                     "bad or too long", bad - len(refused))
    return EncodedDataset(name, config.weight, encoded, len(too_long), prints)


class Mixture:
    """Batches drawn from several datasets by weight; the order is fixed by the stage's seed.

    The draw for optimizer step `s` depends only on (seed, s), so a run resumed at step
    `s` sees exactly the batches an uninterrupted run would. The objective makes each
    draw's examples a batch (`Objective.batch`).
    """

    def __init__(self, datasets: list[EncodedDataset], objective: Objective):
        self.datasets = [d for d in datasets if d.samples]
        self.objective = objective
        self.weights = torch.tensor([d.weight for d in self.datasets], dtype=torch.float64)
        self.batch_size = objective.stage.batch_size
        self.seed = objective.stage.seed

    def __len__(self) -> int:
        return sum(len(d.samples) for d in self.datasets)

    def examples(self, step: int, micro: int = 0, rank: int = 0, world_size: int = 1) -> list[dict]:
        """The examples of (step, micro); under DDP, this process's share of the global batch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 997 + micro)
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator)
        chosen = []
        for index in which.tolist():
            samples = self.datasets[index].samples
            chosen.append(samples[int(torch.randint(len(samples), (1,), generator=generator))])
        return chosen[rank::world_size]

    def batch(self, step: int, micro: int = 0, rank: int = 0, world_size: int = 1):
        """The objective's batch of (step, micro) for this process."""
        return self.objective.batch(self.examples(step, micro, rank, world_size))
