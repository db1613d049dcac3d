"""`pixel_shuffle`: space-to-depth token reduction then an MLP (nanoVLM, Idefics3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector, square_side
from polymodal.connectors.mlp import mlp_layers
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


@dataclass
class PixelShuffleConnectorConfig(ConnectorConfig):
    kind: str = "pixel_shuffle"
    factor: int = 2  # r: each r x r block of tokens becomes one token with r*r times the channels
    depth: int = 1  # linear layers of the MLP after the shuffle (nanoVLM uses 1)
    bias: bool = True  # Idefics3/SmolVLM's single projection has none (bias: false, depth 1)
    # Idefics3's image markers: the processor of Idefics3/SmolVLM writes each image as
    # <fake_token_around_image><global-img> K x <image> <fake_token_around_image>. With
    # `markers`, the connector gives those K + 3 tokens: two learned vectors around its K
    # (the first one twice), which an export writes as those tokens' embedding rows.
    markers: bool = False


def space_to_depth(features: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    """[B, side*side, D] -> [B, (side/r)^2, D*r*r], each r x r neighbourhood stacked on channels."""
    batch, _, dim = features.shape
    blocks = side // factor
    grid = features.reshape(batch, blocks, factor, blocks, factor, dim)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, blocks * blocks, factor * factor * dim)


@register_connector("pixel_shuffle", config=PixelShuffleConnectorConfig)
class PixelShuffleConnector(Connector):
    """Reduces S tokens to S / r^2 by stacking neighbours on channels, then projects
    (Idefics3, Laurençon et al. 2024; transformers' `Idefics3Connector`, whose channel order
    `space_to_depth` keeps). With `markers`, Idefics3's image markers surround the tokens."""

    def __init__(self, config: PixelShuffleConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        self.side = square_side(in_tokens, "pixel_shuffle", key)
        if config.factor < 1 or self.side % config.factor:
            raise ConfigError(f"{key}.factor: {config.factor} does not divide the "
                              f"{self.side}x{self.side} token grid")
        self.factor = config.factor
        self.num_tokens = (self.side // config.factor) ** 2 + (3 if config.markers else 0)
        self.mlp = mlp_layers(in_dim * config.factor**2, out_dim, config.depth)
        if not config.bias:
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.register_parameter("bias", None)
        # [2, out_dim]: <fake_token_around_image> and <global-img>, small as new embedding rows are
        markers = nn.Parameter(torch.randn(2, out_dim) * 0.02) if config.markers else None
        self.register_parameter("markers", markers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, S / r^2, out_dim], or [B, S / r^2 + 3, out_dim] with markers
        (around, global, the S / r^2 tokens, around)."""
        tokens = self.mlp(space_to_depth(features, self.side, self.factor))
        if self.markers is None:
            return tokens
        around, global_image = self.markers.to(tokens.dtype).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        return torch.cat([around[:, None], global_image[:, None], tokens, around[:, None]], dim=1)
