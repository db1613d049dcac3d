"""`stack`: frames stacked in time, then an MLP: a 1-D pixel shuffle for audio (LLaMA-Omni's
downsampling of Whisper states, Fang et al. 2024; Qwen-Audio pools its states likewise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector
from polymodal.connectors.mlp import mlp_layers
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


@dataclass
class StackConnectorConfig(ConnectorConfig):
    kind: str = "stack"
    factor: int = 5  # k: each run of k states becomes one token with k times the channels
    depth: int = 2  # linear layers of the MLP after stacking
    norm: bool = True  # LayerNorm over each stacked token first (states of a frozen encoder vary in scale)


@register_connector("stack", config=StackConnectorConfig)
class StackConnector(Connector):
    """S states -> ceil(S / k) tokens, each the concatenation of k neighbours, then an MLP."""

    def __init__(self, config: StackConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        if config.factor < 1 or config.depth < 1:
            raise ConfigError(f"{key}.factor and depth: must be at least 1")
        self.factor = config.factor
        self.num_tokens = -(-in_tokens // config.factor)
        self.norm = nn.LayerNorm(in_dim * config.factor) if config.norm else nn.Identity()
        self.mlp = mlp_layers(in_dim * config.factor, out_dim, config.depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, ceil(S / k), out_dim]; the last run is zero-padded."""
        batch, length, dim = features.shape
        padded = F.pad(features, (0, 0, 0, self.num_tokens * self.factor - length))
        stacked = padded.reshape(batch, self.num_tokens, self.factor * dim)
        return self.mlp(self.norm(stacked))
