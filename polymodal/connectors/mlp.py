"""`linear` and `mlp` (LLaVA-1.5): token-wise projections that keep the token count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


def mlp_layers(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """Linear(in, out), then (GELU, Linear(out, out)) x (depth - 1): LLaVA-1.5's projector for depth 2."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@dataclass
class LinearConnectorConfig(ConnectorConfig):
    kind: str = "linear"


@dataclass
class MLPConnectorConfig(ConnectorConfig):
    kind: str = "mlp"
    depth: int = 2
    # LayerNorm over each token's features first, as InternVL's projector: a ReLU CNN's
    # features are all positive, so its tokens share one large direction and differ little.
    norm: bool = False


@register_connector("linear", config=LinearConnectorConfig)
class LinearConnector(Connector):
    """One linear layer per token (LLaVA-1.0, Fuyu's patch projection)."""

    def __init__(self, config: LinearConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.num_tokens = in_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, S, out_dim]."""
        return self.proj(features)


@register_connector("mlp", config=MLPConnectorConfig)
class MLPConnector(Connector):
    """A GELU MLP per token, `depth` linear layers (LLaVA-1.5 uses 2)."""

    def __init__(self, config: MLPConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        if config.depth < 1:
            raise ConfigError(f"{key}.depth: must be at least 1")
        self.norm = nn.LayerNorm(in_dim) if config.norm else nn.Identity()
        self.mlp = mlp_layers(in_dim, out_dim, config.depth)
        self.num_tokens = in_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, S, out_dim]."""
        return self.mlp(self.norm(features))
