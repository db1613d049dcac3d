"""What the series encoders share: loading a series file, sizes taken from the data, RevIN.

A series encoder reads `[B, channels, length]` float32, NaN where a series has no value
(`processing.series.pad_series` pads time on the left and missing channels with NaN). NaN
never reaches a parameter: the observed mask is taken from it first, then the values are
normalised over observed steps only and the padding is set to zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder
from polymodal.errors import ConfigError
from polymodal.processing.series import pad_series, read_series


@dataclass
class SeriesEncoderConfig(EncoderConfig):
    """Sizes every series encoder has. 0 means "from the training data": training fills
    them (`fit_to_data`) with the most channels and steps among the recipe's series
    before the model is built, and the saved config holds the numbers."""

    channels: int = 0  # C: series with fewer are padded with NaN channels
    length: int = 0  # T: time steps; shorter series are left-padded with NaN
    affine: bool = False  # RevIN's learned per-channel scale and shift after normalising


@dataclass
class SeriesStatistics:
    """Each series' channel statistics over its observed steps: mean and std [B, C, 1]."""

    mean: torch.Tensor
    std: torch.Tensor


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., ICLR 2022, "Reversible Instance
    Normalization for Accurate Time-Series Forecasting against Distribution Shift"; code
    ts-kim/RevIN): each series' channel minus its mean, over its standard deviation, both
    over the OBSERVED steps only (NaN is padding), then an optional learned affine map.
    `denormalize` is the exact inverse, so a forecast made in normalised space maps back
    to the input's level and scale.
    """

    def __init__(self, channels: int, affine: bool = False, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels, 1)) if affine else None

    def statistics(self, series: torch.Tensor) -> SeriesStatistics:
        """[B, C, L] with NaN padding -> mean and std [B, C, 1] over observed steps.

        A channel with no observed step (a padded channel) gets mean 0 and std sqrt(eps).
        The std is the population one plus eps inside the root, as RevIN's."""
        observed = ~torch.isnan(series)
        values = torch.nan_to_num(series, nan=0.0)
        count = observed.sum(-1, keepdim=True).clamp_min(1)
        mean = values.sum(-1, keepdim=True) / count
        variance = ((values - mean) * observed).pow(2).sum(-1, keepdim=True) / count
        return SeriesStatistics(mean, torch.sqrt(variance + self.eps))

    def normalize(self, series: torch.Tensor, statistics: SeriesStatistics | None = None) -> torch.Tensor:
        """[B, C, L] -> normalised [B, C, L] with 0 wherever the input is NaN. `statistics`
        defaults to the series' own (a future window is normalised with its context's)."""
        statistics = self.statistics(series) if statistics is None else statistics
        observed = ~torch.isnan(series)
        normalized = (torch.nan_to_num(series, nan=0.0) - statistics.mean) / statistics.std
        if self.weight is not None:
            normalized = normalized * self.weight + self.bias
        return normalized * observed  # padding is 0, its gradient too

    def denormalize(self, values: torch.Tensor, statistics: SeriesStatistics) -> torch.Tensor:
        """Normalised values [B, C, H] -> the series' own scale [B, C, H] (the inverse of
        `normalize` with the same statistics)."""
        if self.weight is not None:
            values = (values - self.bias) / self.weight
        return values * statistics.std + statistics.mean


def scale_features(statistics: SeriesStatistics) -> torch.Tensor:
    """What RevIN takes away, as features the encoder may add back: [B, C, 2] of
    asinh(mean) (a signed log: levels from 0.01 to 1e6 stay in a small range) and log std.
    Classification needs them: a standing and a running wrist differ most in scale."""
    return torch.cat([torch.asinh(statistics.mean), torch.log(statistics.std)], dim=-1)


class SeriesEncoder(Encoder):
    """Base of the series encoders: modality `series`, inputs [B, channels, length] with
    NaN padding, RevIN statistics over observed steps (`statistics`, `normalize`,
    `denormalize`), and `fit_to_data` to take the sizes from the training series.

    Raises:
        ConfigError: channels or length still 0 when the model is built (a recipe never
            trained, e.g. `polymodal chat recipe.yaml`).
    """

    modality = "series"
    image_size = None

    def __init__(self, config: SeriesEncoderConfig, key: str):
        super().__init__()
        if config.channels < 1 or config.length < 1:
            raise ConfigError(f"{key}.channels and .length: {config.channels} and {config.length} "
                              f"(0 means from the training data): train the recipe first, or set both")
        self.channels, self.length = config.channels, config.length
        self.revin = RevIN(config.channels, affine=config.affine)

    def load_media(self, path) -> torch.Tensor:
        """A `.npy` or `.csv` file (or an array) -> [channels, length], NaN-padded; a
        longer series keeps its last `length` steps (`processing.series.crop_series`).
        UserError naming the file for an unreadable, NaN-holding or too wide series."""
        source = str(path) if isinstance(path, (str, os.PathLike)) else None
        return pad_series(read_series(path), self.channels, self.length, source=source)

    @classmethod
    def sizes_from_data(cls, config: SeriesEncoderConfig) -> bool:
        return config.channels == 0 or config.length == 0

    @classmethod
    def fit_to_data(cls, config: SeriesEncoderConfig, series_list) -> SeriesEncoderConfig:
        """Fill `channels` and `length` that are 0 with the largest channel count and step
        count among `series_list` (files, arrays, or [C, T] tensors); sizes already set are
        kept. The config is changed in place and returned. UserError for a series that
        cannot be read (named by read_series)."""
        channels = length = 0
        for series in series_list:
            count, steps = series.shape if isinstance(series, torch.Tensor) else read_series(series).shape
            channels, length = max(channels, count), max(length, steps)
        config.channels = config.channels or channels
        config.length = config.length or length
        return config

    def statistics(self, series: torch.Tensor) -> SeriesStatistics:
        """RevIN's statistics of input series [B, C, L]: mean and std [B, C, 1]."""
        return self.revin.statistics(series)

    def normalize(self, series: torch.Tensor, statistics: SeriesStatistics | None = None) -> torch.Tensor:
        """[B, C, L] -> RevIN-normalised [B, C, L] (0 at NaN); see `RevIN.normalize`."""
        return self.revin.normalize(series, statistics)

    def denormalize(self, values: torch.Tensor, statistics: SeriesStatistics) -> torch.Tensor:
        """Normalised values [B, C, H] -> the input's scale; the inverse of `normalize`."""
        return self.revin.denormalize(values, statistics)
