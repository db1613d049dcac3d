"""Encoder sizes taken from the training data, before the model is built.

A series encoder's `channels: 0` and `length: 0` mean "as the training data needs": a
recipe then works for any aeon classification set (BasicMotions' 6 channels of 100 steps,
PickupGestureWiimoteZ's 1 channel of up to 361) with only its name changed; PatchTST's
`patch_len: 0` follows the fitted length (JapaneseVowels' 26 steps: patches of 4). Before
`build_model`, `fit_encoder_sizes` reads the series of every stage's datasets (and their
validation data) and hands them to the encoder kind's `fit_to_data(config, series_list)`
classmethod, which fills the sizes; the built model, and so its saved config.json, holds
the numbers.
"""

from __future__ import annotations

from polymodal.config import RecipeConfig
from polymodal.data.datasets import read_dataset
from polymodal.encoders.base import Encoder
from polymodal.errors import ConfigError, UserError
from polymodal.processing.series import read_series
from polymodal.registry import ENCODERS


def fit_encoder_sizes(recipe: RecipeConfig) -> None:
    """Fill, in `recipe.model.encoders`, the sizes left at 0 by each encoder whose kind
    says so (`Encoder.sizes_from_data`) through its `fit_to_data(config, series_list) ->
    config` (series_list: every usable series of that modality in the recipe's stages, each a
    float32 tensor [C, T]); the config it returns replaces the old one.

    Raises:
        ConfigError naming model.encoders.<modality> when a size is 0 but the stages hold
        no usable series of that modality to take it from.
    """
    for modality, config in list(recipe.model.encoders.items()):
        kind = ENCODERS.get(config.kind).builder
        # a kind registered as a plain function has no sizes to take from the data
        if not (isinstance(kind, type) and issubclass(kind, Encoder)) or not kind.sizes_from_data(config):
            continue
        series = modality_series(recipe, modality)
        if not series:
            raise ConfigError(f"model.encoders.{modality}: channels and length 0 are taken from the "
                              f"training data, but the recipe's stages hold no usable {modality} "
                              f"samples; set them", field=f"model.encoders.{modality}")
        recipe.model.encoders[modality] = kind.fit_to_data(config, series)


def modality_series(recipe: RecipeConfig, modality: str) -> list:
    """Every usable series of `modality` in the stages' datasets and validation data, each
    file read once; bad samples (their `problem` set, or a file read_series refuses) are
    left out here and listed by the stage's data checks."""
    seen, series = set(), []
    for stage in recipe.stages:
        datasets = [*stage.data, *(stage.validation.data if stage.validation else [])]
        for dataset in datasets:
            for sample in read_dataset(dataset):
                if sample.problem:
                    continue
                for path in sample.media.get(modality, []):
                    if path in seen:
                        continue
                    seen.add(path)
                    try:
                        series.append(read_series(path))
                    except UserError:
                        continue
    return series
