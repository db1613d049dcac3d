"""`reprogramming`: Time-LLM's reprogramming layer: series patches attend to text prototypes.

Jin et al., ICLR 2024, "Time-LLM: Time Series Forecasting by Reprogramming Large Language
Models" (code KimMeen/Time-LLM, models/TimeLLM.py `ReprogrammingLayer` and `mapping_layer`):
each patch token is a query of multi-head cross-attention whose keys and values are P
"text prototypes", linear combinations of the LLM's own word embeddings, so every token the
LLM reads is a mixture of directions it already knows.

Where the prototypes come from (our choice, and why): Time-LLM maps the WHOLE vocabulary to
them with a learned linear layer, 49,152 x P weights for SmolLM2 (12.6M at P = 256) and a
[P, V] x [V, D] product every step. Here the map reads a fixed subset of `vocabulary` word
embeddings (evenly spaced over the tokenizer's ids, from frequent merges to rare words):
4,096 x 256 = 1M weights and a product 12 times smaller, prototypes still in the span of
real words. The word embeddings are the LLM's (bound by the model after it is built, never
registered here: not in this connector's state dict, nothing stored twice) and are read
detached: this connector never moves the LLM's embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import ConnectorConfig
from polymodal.connectors.base import Connector
from polymodal.errors import ConfigError
from polymodal.registry import register_connector


@dataclass
class ReprogrammingConnectorConfig(ConnectorConfig):
    kind: str = "reprogramming"
    prototypes: int = 256  # P: text prototypes the patches attend to (Time-LLM: 1000)
    vocabulary: int = 4096  # word embeddings the prototypes are learned from (a fixed subset)
    heads: int = 8
    head_dim: int = 32  # E: query/key width per head (Time-LLM's d_keys, its d_ff)
    dropout: float = 0.1  # on the attention weights, as Time-LLM


@register_connector("reprogramming", config=ReprogrammingConnectorConfig)
class ReprogrammingConnector(Connector):
    """Patch features [B, S, in_dim] -> LLM tokens [B, S, out_dim], one per patch.

    prototypes [P, D_llm] = mapping(word_embeddings[subset].T).T; queries from the patches,
    keys and values from the prototypes, H heads of width E; an output projection to D_llm.
    `bind_word_embeddings` must be called before the first forward (MultimodalLM does it).
    """

    def __init__(self, config: ReprogrammingConnectorConfig, in_dim: int, out_dim: int, in_tokens: int, key: str):
        super().__init__()
        if min(config.prototypes, config.vocabulary, config.heads, config.head_dim) < 1:
            raise ConfigError(f"{key}: prototypes, vocabulary, heads and head_dim must be at least 1")
        inner = config.heads * config.head_dim
        self.heads, self.head_dim, self.num_tokens = config.heads, config.head_dim, in_tokens
        self.mapping = nn.Linear(config.vocabulary, config.prototypes)  # Time-LLM's mapping_layer
        self.query = nn.Linear(in_dim, inner)
        self.key = nn.Linear(out_dim, inner)
        self.value = nn.Linear(out_dim, inner)
        self.output = nn.Linear(inner, out_dim)
        self.dropout = nn.Dropout(config.dropout)
        # Which rows of the word embeddings the mapping reads: set when bound, saved with the
        # weights so a loaded model reads the rows it was trained on.
        self.register_buffer("vocabulary_ids", torch.zeros(config.vocabulary, dtype=torch.long))
        self._word_embeddings: list[torch.Tensor] = []  # a list: nn.Module does not register it

    def bind_word_embeddings(self, weight: torch.Tensor, vocabulary_size: int) -> None:
        """Read prototypes from `weight` [V, D_llm], the LLM's input embeddings (the
        Parameter itself, so a later `.to()` or weight load is seen), over its first
        `vocabulary_size` ids (the tokenizer's own, without added tokens or padding rows).
        With fewer ids than `vocabulary` (a tiny test tokenizer), some rows repeat."""
        self._word_embeddings[:] = [weight]
        ids = torch.linspace(0, vocabulary_size - 1, len(self.vocabulary_ids)).round().long()
        self.vocabulary_ids.copy_(ids)

    def prototypes(self) -> torch.Tensor:
        """The text prototypes [P, D_llm]: learned mixtures of the bound word embeddings."""
        if not self._word_embeddings:
            raise RuntimeError("reprogramming connector: bind_word_embeddings was not called")
        words = self._word_embeddings[0].detach()[self.vocabulary_ids.to(self._word_embeddings[0].device)]
        return self.mapping(words.to(self.mapping.weight.dtype).T).T  # [V_s, D].T -> [D, P] -> [P, D]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, S, in_dim] -> [B, S, out_dim]."""
        batch, length, _ = features.shape
        prototypes = self.prototypes()
        queries = self.query(features).view(batch, length, self.heads, self.head_dim)  # [B, S, H, E]
        keys = self.key(prototypes).view(-1, self.heads, self.head_dim)  # [P, H, E]
        values = self.value(prototypes).view(-1, self.heads, self.head_dim)
        scores = torch.einsum("bshe,phe->bhsp", queries, keys) / math.sqrt(self.head_dim)
        weights = self.dropout(torch.softmax(scores, dim=-1))  # [B, H, S, P]
        attended = torch.einsum("bhsp,phe->bshe", weights, values).reshape(batch, length, -1)
        return self.output(attended)
