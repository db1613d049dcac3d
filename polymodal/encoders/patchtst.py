"""`patchtst`: PatchTST's input layer: RevIN, patches, a linear embedding, a few transformer layers.

Nie et al., ICLR 2023, "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers" (code yuqinie98/PatchTST, `PatchTST_backbone`): each channel of a series,
normalised by RevIN, is cut into patches of `patch_len` steps every `stride` steps; each
patch is one token (a linear map of its values plus a learned position). Channels are
independent (one token per channel and patch, a learned channel embedding telling them
apart, attention within a channel) as in the paper, or mixed (one token per patch from
every channel's values), which gives C times fewer LLM tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.series_base import SeriesEncoder, SeriesEncoderConfig, scale_features
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


def patch_count(length: int, patch_len: int, stride: int) -> int:
    """Patches covering `length` steps: the series is left-padded until the last patch
    ends at its last step (PatchTST pads its end by one stride; here the padding goes
    where pad_series puts it, before the first step). 100 steps, 16 / 8: 12 patches."""
    return -(-max(length - patch_len, 0) // stride) + 1


PATCH_LENGTHS = (16, 8, 4, 2)  # the patch lengths `patch_len: 0` chooses from, longest first
MIN_PATCHES = 8  # ... the longest giving at least this many patches


def fit_patch_length(length: int) -> tuple[int, int]:
    """`patch_len` and `stride` for `length` steps when a recipe leaves them to the data:
    the longest of 16, 8, 4, 2 steps that gives at least 8 patches (2 when none does),
    every half patch. PatchTST's 16 / 8 (its paper's setting for lookbacks of 336 and 512)
    suits BasicMotions' 100 steps (12 patches) and keeps it; JapaneseVowels' 26 steps would
    get 3 patches of 16 and get 12 of 4 every 2 instead."""
    for patch_len in PATCH_LENGTHS:
        if patch_count(length, patch_len, patch_len // 2) >= MIN_PATCHES:
            return patch_len, patch_len // 2
    return PATCH_LENGTHS[-1], PATCH_LENGTHS[-1] // 2


@dataclass
class PatchTSTConfig(SeriesEncoderConfig):
    kind: str = "patchtst"
    # steps per patch (token); 0: from the training data's length (`fit_patch_length`)
    patch_len: int = 16
    stride: int = 8  # steps between patch starts (overlap below patch_len); 0: patch_len // 2
    width: int = 64  # token width
    depth: int = 1  # transformer layers over the patches (0: the embedding alone)
    heads: int = 4
    # independent: C x patches tokens (PatchTST); mixed: one token per patch of all channels.
    channel_mode: Literal["independent", "mixed"] = "independent"
    # Add an embedding of each channel's level and scale (asinh mean, log std) that RevIN
    # takes away: needed where they tell classes apart (BasicMotions' standing vs running).
    scale_embedding: bool = True
    dropout: float = 0.0


@register_encoder("patchtst", config=PatchTSTConfig)
class PatchTSTEncoder(SeriesEncoder):
    """Series [B, C, L] (NaN padding) -> patch tokens [B, num_tokens, width].

    num_tokens is C * N (independent, channel-major: channel 0's N patches first) or N
    (mixed), N = patch_count(length, patch_len, stride). A patch with no observed step is
    a zero token, and transformer layers do not attend to it. `normalize`/`denormalize`
    (RevIN) map a forecast in normalised space back to the input's scale.
    """

    def __init__(self, config: PatchTSTConfig, loader=None, key: str = "encoder"):
        super().__init__(config, key)
        if config.patch_len == 0 or config.stride == 0:
            raise ConfigError(f"{key}.patch_len and .stride: {config.patch_len} and {config.stride} "
                              f"(0 means from the training data): train the recipe first, or set both")
        if config.patch_len < 1 or config.stride < 1:
            raise ConfigError(f"{key}.patch_len and .stride: must be at least 1")
        if config.heads < 1 or config.width % config.heads:
            raise ConfigError(f"{key}.heads: {config.heads} does not divide width {config.width}")
        self.patch_len, self.stride = config.patch_len, config.stride
        self.patches = patch_count(config.length, config.patch_len, config.stride)
        self.padded_length = (self.patches - 1) * config.stride + config.patch_len
        self.independent = config.channel_mode == "independent"
        channels, width = config.channels, config.width
        self.embed = nn.Linear(config.patch_len * (1 if self.independent else channels), width)
        self.position = nn.Parameter(torch.randn(self.patches, width) * 0.02)
        self.channel_embedding = nn.Parameter(torch.randn(channels, 1, width) * 0.02) if self.independent else None
        self.scale = (nn.Linear(2 if self.independent else 2 * channels, width)
                      if config.scale_embedding else None)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.heads, 2 * width, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(width) if config.depth else nn.Identity()
        self.num_tokens = channels * self.patches if self.independent else self.patches
        self.out_dim = width

    @classmethod
    def sizes_from_data(cls, config: PatchTSTConfig) -> bool:
        return super().sizes_from_data(config) or config.patch_len == 0 or config.stride == 0

    @classmethod
    def fit_to_data(cls, config: PatchTSTConfig, series_list) -> PatchTSTConfig:
        """The series sizes (`SeriesEncoder.fit_to_data`), then a `patch_len` of 0 from the
        fitted length (`fit_patch_length`) and a `stride` of 0 as half the patch; sizes
        already set are kept. Changed in place and returned."""
        super().fit_to_data(config, series_list)
        if config.patch_len == 0:
            config.patch_len, _ = fit_patch_length(config.length)
        config.stride = config.stride or max(config.patch_len // 2, 1)
        return config

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """[B, channels, length] float, NaN where no value -> [B, num_tokens, width]."""
        batch = series.shape[0]
        statistics = self.revin.statistics(series)
        values = self.revin.normalize(series, statistics)  # NaN gone: 0 at padding
        observed = ~torch.isnan(series)
        extra = self.padded_length - series.shape[-1]
        values, observed = F.pad(values, (extra, 0)), F.pad(observed, (extra, 0), value=False)
        patches = values.unfold(-1, self.patch_len, self.stride)  # [B, C, N, P]
        patch_observed = observed.unfold(-1, self.patch_len, self.stride).any(-1)  # [B, C, N]
        if self.independent:
            tokens = self.embed(patches) + self.position + self.channel_embedding  # [B, C, N, W]
            if self.scale is not None:
                tokens = tokens + self.scale(scale_features(statistics))[:, :, None]
            tokens, keep = tokens.flatten(0, 1), patch_observed.flatten(0, 1)  # [B * C, N, W], [B * C, N]
        else:
            tokens = self.embed(patches.transpose(1, 2).flatten(2)) + self.position  # [B, N, W]
            if self.scale is not None:
                tokens = tokens + self.scale(scale_features(statistics).flatten(1))[:, None]
            keep = patch_observed.any(1)  # [B, N]
        return self.transform(tokens, keep).reshape(batch, self.num_tokens, self.out_dim)

    def transform(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The transformer layers over [R, N, W] tokens; `keep` [R, N] False at patches with
        no observed step, which are zero tokens and never attended to."""
        tokens = tokens * keep[..., None]
        if not self.layers:
            return tokens
        # A row with nothing observed (a padded channel) attends to all its zero tokens:
        # a softmax over no key at all would be NaN.
        padding = ~keep & keep.any(-1, keepdim=True)
        for layer in self.layers:
            tokens = layer(tokens, src_key_padding_mask=padding)
        return self.norm(tokens) * keep[..., None]
