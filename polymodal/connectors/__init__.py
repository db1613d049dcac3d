"""Connectors: encoder features [B, S, D_enc] -> LLM tokens [B, K, D_llm]. Importing registers every kind."""

from polymodal.connectors import (  # noqa: F401
    cabstractor,
    mlp,
    perceiver,
    pixel_shuffle,
    qformer,
    reprogramming,
    stack,
)
from polymodal.connectors.base import Connector, build_connector

__all__ = ["Connector", "build_connector"]
