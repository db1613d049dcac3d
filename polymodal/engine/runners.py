"""Decoder runners: prefill a batch of embeddings, then one token per step, with a KV cache.

`LlamaRunner` drives the Llama family (Llama, SmolLM2, Qwen2, Mistral) itself: it
reuses the model's own modules (norms, projections with any LoRA, MLP, rotary
embedding) but keeps a preallocated KV cache and calls scaled-dot-product attention
directly, skipping the per-step mask building and cache bookkeeping of the generic
path. `HFRunner` works for any transformers causal LM through its forward().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

LLAMA_FAMILY = {"llama", "qwen2", "mistral"}


def make_runner(model):
    """The fastest runner that supports this model."""
    config = model.config
    sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
    if config.model_type in LLAMA_FAMILY and not sliding:
        return LlamaRunner(model)
    return HFRunner(model)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaRunner:
    """Llama-family decoding with a static KV cache [B, H_kv, T_max, head_dim] per layer."""

    def __init__(self, model):
        self.model = model
        self.body = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_mask: torch.Tensor | None = None  # [B, T_max] bool: which cache slots are real
        self.length = 0  # cache slots filled so far
        self.positions: torch.Tensor | None = None  # [B] position of the next token
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [T_max, head_dim]

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        """embeds [B, T, D], attention_mask [B, T] (left padding) -> last-position logits [B, V]."""
        self._allocate(embeds, max_length)
        self.key_mask[:, : embeds.shape[1]] = attention_mask.bool()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        self.positions = positions[:, -1] + 1
        return self.lm_head(self._forward(embeds, positions, attention_mask.bool()))

    def prefill_shared(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                       suffix: torch.Tensor, suffix_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        """Prompts that share a prefix (system prompt + image) compute it once.

        prefix [G, P, D] and prefix_mask [G, P], left padded; owner [B]: the prefix of each
        row; suffix [B, S, D] and suffix_mask [B, S], left padded (the padding sits between
        prefix and suffix, masked out). Returns last-position logits [B, V].
        """
        self._allocate(prefix, max_length)
        self.key_mask[:, : prefix.shape[1]] = prefix_mask.bool()
        self._forward(prefix, (prefix_mask.cumsum(-1) - 1).clamp(min=0), prefix_mask.bool())
        # Every row starts from a copy of its prefix's cache: [G, ...] -> [B, ...].
        self.keys = [keys[owner] for keys in self.keys]
        self.values = [values[owner] for values in self.values]
        self.key_mask = self.key_mask[owner]
        self.key_mask[:, self.length : self.length + suffix.shape[1]] = suffix_mask.bool()
        before = prefix_mask.sum(-1)[owner]  # [B] real prefix tokens of each row
        positions = before[:, None] + (suffix_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        self.positions = positions[:, -1] + 1
        return self.lm_head(self._forward(suffix, positions, suffix_mask.bool()))

    def _allocate(self, embeds: torch.Tensor, max_length: int) -> None:
        """An empty cache of `max_length` slots for each row of embeds [B, T, D]."""
        batch = embeds.shape[0]
        shape = (batch, self.kv_heads, max_length, self.head_dim)
        layers = len(self.body.layers)
        self.keys = [embeds.new_zeros(shape) for _ in range(layers)]
        self.values = [embeds.new_zeros(shape) for _ in range(layers)]
        self.key_mask = torch.zeros(batch, max_length, dtype=torch.bool)
        # The rotary table once for every position this generation can reach.
        cos, sin = self.body.rotary_emb(embeds, torch.arange(max_length)[None])
        self.rotary = (cos[0], sin[0])
        self.length = 0

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B] -> next logits [B, V]; appends one slot to the cache."""
        embeds = self.body.embed_tokens(token_ids[:, None])  # [B, 1, D]
        self.key_mask[:, self.length] = True
        positions = self.positions[:, None]
        self.positions = self.positions + 1
        return self.lm_head(self._forward(embeds, positions))

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Carry on with only these rows [B'] of the batch (the others finished)."""
        self.keys = [keys[rows] for keys in self.keys]
        self.values = [values[rows] for values in self.values]
        self.key_mask, self.positions = self.key_mask[rows], self.positions[rows]

    def _mask(self, length: int, start: int) -> torch.Tensor | None:
        """Boolean attention mask [B, 1, T, start + T], or None when nothing is masked."""
        keys = self.key_mask[:, : start + length]  # [B, S]
        if length == 1:
            return None if bool(keys.all()) else keys[:, None, None, :]
        query_at = torch.arange(start, start + length)[:, None]  # [T, 1] cache slot of each query
        key_at = torch.arange(start + length)[None, :]  # [1, S]
        mask = keys[:, None, None, :] & (key_at <= query_at)  # [B, 1, T, S] causal and real
        # A padding query sees no key at all; let it see itself so softmax stays finite.
        return mask | (key_at == query_at)

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor,
                 real: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, D] at positions [B, T] -> the final-norm hidden state of each row's
        last position [B, D]; fills the cache.

        `real` [B, T] marks the tokens that are not padding. The projections and the MLP,
        nearly all the work, run on the real tokens only, packed as [N, D]; padding exists
        only inside attention, where it is masked out.
        """
        batch, length, _ = hidden.shape
        start, end = self.length, self.length + length
        real = torch.ones(batch, length, dtype=torch.bool) if real is None else real
        tokens = hidden[real]  # [N, D]
        cos, sin = self.rotary[0][positions[real]][:, None], self.rotary[1][positions[real]][:, None]  # [N, 1, hd]
        mask = self._mask(length, start)
        for index, layer in enumerate(self.body.layers):
            attention = layer.self_attn
            normed = _rms_norm(layer.input_layernorm, tokens)
            query = attention.q_proj(normed).view(-1, self.heads, self.head_dim)
            key = attention.k_proj(normed).view(-1, self.kv_heads, self.head_dim)
            # Rotate queries and keys in one go: [N, H + H_kv, head_dim].
            both = torch.cat([query, key], dim=1)
            both = _unpack(both * cos + _rotate_half(both) * sin, real).transpose(1, 2)  # [B, H + H_kv, T, hd]
            value = attention.v_proj(normed).view(-1, self.kv_heads, self.head_dim)
            self.keys[index][:, :, start:end] = both[:, self.heads :]
            self.values[index][:, :, start:end] = _unpack(value, real).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                both[:, : self.heads], self.keys[index][:, :, :end], self.values[index][:, :, :end],
                attn_mask=mask, enable_gqa=self.kv_heads != self.heads,
            )  # [B, H, T, head_dim]
            tokens = tokens + attention.o_proj(out.transpose(1, 2)[real].reshape(len(tokens), -1))
            tokens = tokens + layer.mlp(_rms_norm(layer.post_attention_layernorm, tokens))
        self.length = end
        last = real.sum(-1).cumsum(0) - 1  # [B] packed index of each row's last token (left padding)
        return _rms_norm(self.body.norm, tokens[last])


def _unpack(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[N, ...] real tokens -> [B, T, ...] with zeros where `real` [B, T] is False."""
    if bool(real.all()):
        return packed.view(*real.shape, *packed.shape[1:])
    out = packed.new_zeros(*real.shape, *packed.shape[1:])
    out[real] = packed
    return out


def _rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm as one fused op (statistics in float32, as the model does)."""
    eps = norm.variance_epsilon
    if hidden.dtype == torch.float32:
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, eps)
    return norm.weight * F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps).to(hidden.dtype)


class HFRunner:
    """Any transformers causal LM through its own forward() and DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.attention_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        self.cache = DynamicCache()
        self.attention_mask = attention_mask
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1] + 1
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def prefill_shared(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                       suffix: torch.Tensor, suffix_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        """The same answer as LlamaRunner.prefill_shared, by copying each prefix into its rows."""
        embeds = torch.cat([prefix[owner], suffix], dim=1)
        return self.prefill(embeds, torch.cat([prefix_mask[owner], suffix_mask], dim=1), max_length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Carry on with only these rows [B'] of the batch (the others finished)."""
        self.cache.batch_select_indices(rows)
        self.attention_mask, self.positions = self.attention_mask[rows], self.positions[rows]

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = self.model(input_ids=token_ids[:, None], attention_mask=self.attention_mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.positions = self.positions + 1
        return out.logits[:, -1]
