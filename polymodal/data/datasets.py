"""A stage's dataset as samples: the format named by `format`, read through the registry."""

from __future__ import annotations

import dataclasses

from polymodal.config import DatasetConfig
from polymodal.data.sample import Sample, split_turns
from polymodal.registry import DATASET_FORMATS


def format_options(options: DatasetConfig) -> DatasetConfig:
    """`options` as its format's own options class (a recipe's already are; a DatasetConfig
    built in Python with only the shared fields becomes one, its checks run).
    Raises UserError for an unknown format, listing the known ones."""
    entry = DATASET_FORMATS.get(options.format)
    if entry.config is None or isinstance(options, entry.config):
        return options
    shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init}
    return entry.config(**shared)


def read_dataset(options: DatasetConfig) -> list[Sample]:
    """The samples of one dataset: read by its format's reader, cut to `limit`, conversations
    split into parts of at most `turns` exchanges. Raises UserError (DataError for a file's
    content) naming what is wrong."""
    options = format_options(options)
    samples = DATASET_FORMATS.get(options.format).builder(options)
    samples = samples[: options.limit] if options.limit else samples
    if options.turns is not None:
        samples = [part for sample in samples for part in split_turns(sample, options.turns)]
    return samples
