"""`cnn1d`: a small 1-D CNN over time, trained from scratch: each position of its last
feature map is one token.

The fully convolutional baseline of time series classification (Wang et al., IJCNN 2017,
"Time Series Classification from Scratch with Deep Neural Networks": stacked 1-D
convolutions over RevIN-normalised values) with strided convolutions, so that the LLM
gets a few tokens rather than one per step. NaN padding is zero in the values and the
observed mask is an input channel of each series channel, so the CNN tells a zero from
no value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from polymodal.encoders.series_base import SeriesEncoder, SeriesEncoderConfig, scale_features
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class CNN1DConfig(SeriesEncoderConfig):
    kind: str = "cnn1d"
    widths: list[int] = field(default_factory=lambda: [32, 64, 64])  # one convolution each
    kernel_size: int = 5
    stride: int = 2  # of every convolution: 100 steps and 3 layers give 13 tokens
    # Each channel's asinh mean and log std (what RevIN takes away) as two constant input channels.
    scale_embedding: bool = True
    pool: int | None = None  # max-pool the last feature map to this many tokens


@register_encoder("cnn1d", config=CNN1DConfig)
class CNN1DEncoder(SeriesEncoder):
    """Series [B, C, L] (NaN padding) -> [B, num_tokens, widths[-1]].

    Input channels: C normalised values, C observed masks (1 where a value is), and with
    `scale_embedding` 2C constants; then per width Conv1d(kernel_size, stride) + GELU.
    """

    def __init__(self, config: CNN1DConfig, loader=None, key: str = "encoder"):
        super().__init__(config, key)
        if not config.widths or config.kernel_size < 1 or config.stride < 1:
            raise ConfigError(f"{key}.widths, .kernel_size, .stride: at least one layer, sizes at least 1")
        self.scale_embedding = config.scale_embedding
        previous, steps, layers = config.channels * (4 if config.scale_embedding else 2), config.length, []
        padding = config.kernel_size // 2
        for width in config.widths:
            layers += [nn.Conv1d(previous, width, config.kernel_size, config.stride, padding), nn.GELU()]
            previous, steps = width, (steps + 2 * padding - config.kernel_size) // config.stride + 1
        if steps < 1:
            raise ConfigError(f"{key}.length: {config.length} steps are too few for {len(config.widths)} "
                              f"convolutions of kernel {config.kernel_size}")
        if config.pool is not None:
            if not 1 <= config.pool <= steps:
                raise ConfigError(f"{key}.pool: must be between 1 and the {steps} positions of the last layer")
            layers.append(nn.AdaptiveMaxPool1d(config.pool))
            steps = config.pool
        self.body = nn.Sequential(*layers)
        self.num_tokens, self.out_dim = steps, previous

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """[B, channels, length] float, NaN where no value -> [B, num_tokens, widths[-1]]."""
        statistics = self.revin.statistics(series)
        values = self.revin.normalize(series, statistics)  # 0 at padding
        inputs = [values, (~torch.isnan(series)).to(values.dtype)]
        if self.scale_embedding:  # [B, C, 2] -> [B, 2C, L], constant in time
            inputs.append(scale_features(statistics).flatten(1)[:, :, None].expand(-1, -1, series.shape[-1]))
        return self.body(torch.cat(inputs, dim=1)).transpose(1, 2)
