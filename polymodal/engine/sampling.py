"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polymodal.errors import ConfigError


@dataclass
class SamplingParams:
    """How to generate. `temperature` 0 means greedy; `top_p` 0 keeps only the most likely
    token (OpenAI's range is 0 to 1); `stop` strings end an answer (not shown); `seed` is any
    integer torch.Generator takes (-2**63 to 2**64 - 1); `logprobs` asks for each chosen
    token's log-probability and `top_logprobs` (0 to 20) for that many alternatives.

    Raises:
        ConfigError: a value out of its range, naming the field (also in `field`).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # always generate max_new_tokens (for benchmarks)
    logprobs: bool = False
    top_logprobs: int = 0
    guidance_scale: float = 1.0  # classifier-free guidance of drawn images (1: none; engine.images)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", "max_new_tokens")
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise ConfigError(f"temperature must be a number of at least 0, got {self.temperature}",
                              "temperature")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be in [0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be at least 0, got {self.top_k}", "top_k")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}", "seed")
        if not 0 <= self.guidance_scale < float("inf"):
            raise ConfigError(f"guidance_scale must be a number of at least 0, got {self.guidance_scale}",
                              "guidance_scale")
        if not 0 <= self.top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", "top_logprobs")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded `seed` (OpenAI's `n`): `seed + index`,
    wrapped into torch's unsigned 64-bit range, so every valid seed works for every choice.
    manual_seed takes a negative seed as its 64-bit two's complement: the same generator."""
    return (seed + index) % 2**64


def choose_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. A temperature below float32's smallest normal
    number (0 included) is greedy: its limit, and one below ~7e-46 is 0 in float32, where
    dividing by it gave 0 / 0 = NaN."""
    if params.temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # The largest logit becomes 0 before dividing, so a tiny temperature cannot overflow
    # to inf (and softmax to NaN): the distribution is the same.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:  # 0 included: the top token alone
        logits = _top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop = before >= top_p
    drop[..., 0] = False  # the most likely token stays, even for top_p 0
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
