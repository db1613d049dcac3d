"""Connectors: encoder features [B, S, D_enc] -> LLM tokens [B, K, D_llm]. Importing registers every kind."""

from polymodal.connectors import cabstractor, mlp, perceiver, pixel_shuffle, qformer, stack  # noqa: F401
from polymodal.connectors.base import Connector, build_connector

__all__ = ["Connector", "build_connector"]
