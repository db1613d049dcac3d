"""The connector interface shared by every kind."""

from __future__ import annotations

import math

from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.errors import ConfigError
from polymodal.registry import CONNECTORS


class Connector(nn.Module):
    """Features [B, S, in_dim] -> LLM tokens [B, num_tokens, out_dim]."""

    num_tokens: int


def build_connector(config: ConnectorConfig, in_dim: int, out_dim: int, in_tokens: int,
                    key: str = "model.connectors.image") -> Connector:
    """Build the registered connector kind named by `config.kind`; `key`, the config's place
    (`model.connectors.audio`), names it in a ConfigError."""
    return CONNECTORS.get(config.kind).builder(config, in_dim, out_dim, in_tokens, key)


def square_side(tokens: int, kind: str, key: str) -> int:
    """The side of a square token grid, or a config error naming the connector."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError(f"{key}: {kind} needs a square grid of tokens, the encoder "
                          f"gives {tokens} (drop the CLS token: keep_cls: false)")
    return side
