"""Output heads on the LLM's hidden states: values instead of tokens.

`ForecastHead` is Time-LLM's output projection (Jin et al., ICLR 2024, "Time-LLM:
Time Series Forecasting by Reprogramming Large Language Models"; code KimMeen/Time-LLM,
models/TimeLLM.py `FlattenHead`): the decoder's last hidden states at a series' tokens are
flattened and mapped by one linear layer to the next `horizon` values of each channel. It
predicts in the series encoder's RevIN-normalised space (each channel's mean and spread over
the observed context), so one head serves series of any level and scale; the model maps the
values back with the input's own statistics (`MultimodalLM.forecast`).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.config import ForecastHeadConfig


class ForecastHead(nn.Module):
    """Hidden states at one series' K tokens [B, K, D] -> future values [B, C, H] (normalised).

    Args:
        config: horizon H, the modality whose tokens it reads, dropout.
        tokens: K, the LLM tokens one item of that modality becomes (its connector's).
        hidden_size: D, the LLM's width.
        channels: C, the series' channels (the encoder's).

    Parameters: K * D * C * H + C * H (SmolLM2's D = 576, 5 tokens, 1 channel, H = 12: 35k).
    The linear layer starts at zero, so a fresh head forecasts each channel's context mean
    (0 in normalised space): the model is unchanged until the head learns.
    """

    def __init__(self, config: ForecastHeadConfig, tokens: int, hidden_size: int, channels: int):
        super().__init__()
        self.config = config
        self.tokens, self.channels, self.horizon = tokens, channels, config.horizon
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(tokens * hidden_size, channels * config.horizon)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], token_mask [B, T] (True at the series' K tokens, one series per
        row) -> [B, C, H]. RuntimeError when a row holds other than K such tokens (the
        objective and the task give one series per sample)."""
        rows = hidden.shape[0]
        counts = token_mask.sum(1)
        if not bool((counts == self.tokens).all()):
            raise RuntimeError(f"forecast head: each row needs one {self.config.modality} item "
                               f"({self.tokens} tokens), got {counts.tolist()}")
        tokens = hidden[token_mask].view(rows, -1)  # [B, K * D], the tokens in order
        return self.linear(self.dropout(tokens.to(self.linear.weight.dtype))).view(rows, self.channels, self.horizon)
