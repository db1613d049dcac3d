"""One decoder-layer step for the Llama family, shared by the batch runner (`LlamaRunner`)
and the server's continuous-batching slots (`SlotCache`).

The step calls the model's own modules (norm weights, `q_proj`, `k_proj`, `v_proj`,
`o_proj` with any LoRA, the MLP, the rotary table) and scaled-dot-product attention
over a `KVCache`, without transformers' per-step mask building and cache bookkeeping.
Only real tokens run through the projections and the MLP, packed as [N, D]; a
`TokenLayout` says where each sits: in the [B, T] grid attention works on (rows x new
tokens, left padding included) and in the cache (row, slot), at which rotary position.
The two callers differ only in that layout: the runner feeds a batch whose rows share
their slots (prefill, then one token each), a slot admits one prompt into its own row and
decodes rows that have different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polymodal.engine.decoder_kernel import (
    UNCHECKED,
    decoder_step,
    head_plan,
    run_step,
    steps_enabled,
)
from polymodal.engine.kv_cache import KVCache
from polymodal.fusion.context import current
from polymodal.kernels.decoder_step import DecoderStep
from polymodal.quantization import Int4Linear, Int8Linear, project

LLAMA_FAMILY = {"llama", "qwen2", "mistral"}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1), the rotary embedding's rotation (RoFormer)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm module `norm` applied as one fused op (statistics in float32,
    as the model does): hidden [..., D] -> [..., D]."""
    eps = norm.variance_epsilon
    if hidden.dtype == torch.float32:
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, eps)
    return norm.weight * F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps).to(hidden.dtype)


@dataclass
class TokenLayout:
    """Where the N new tokens of one decoder call sit; every layer of the call shares it.

    real: [B, T] bool, the grid cells holding a token (None: all of them, no padding).
    rows: the cache rows of the grid's B rows.
    token_rows, token_slots: [N] the cache row and slot each token's key and value go to.
    cos, sin: [N, 1, head_dim] the rotary table at each token's position.
    mask: [B, 1, T, span] bool, the keys each query sees, or None for all of them.
    span: attention reads slots 0..span-1 of the rows.
    shared_slots: the slots of every row's tokens when they are the same for all rows and
        no cell is padding (the batch runner's decoding), else None.
    """

    real: torch.Tensor | None
    rows: slice
    token_rows: torch.Tensor
    token_slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    span: int
    grid: tuple[int, int]  # (B, T)
    shared_slots: slice | None = None

    @classmethod
    def place(cls, cache: KVCache, rotary: tuple[torch.Tensor, torch.Tensor], rows: slice,
              slots: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None) -> TokenLayout:
        """New tokens for cache rows `rows` (B of them) at cache slots `slots` [B or 1, T] and
        rotary positions `positions` [B, T]; `real` [B, T] marks the cells that are not
        padding (None: all). Marks the tokens' slots as real in `cache.key_mask`.
        rotary: (cos, sin) [positions, head_dim]."""
        batch, length = positions.shape
        shared = slots.shape[0] == 1 and length == int(slots[0, -1] - slots[0, 0]) + 1  # one range for all
        slots = slots.expand(batch, length)
        cache_rows = torch.arange(rows.start, rows.stop)[:, None].expand(batch, length)
        if real is not None and bool(real.all()):
            real = None
        if real is None:
            token_rows, token_slots, token_positions = cache_rows.reshape(-1), slots.reshape(-1), positions.reshape(-1)
        else:
            token_rows, token_slots, token_positions = cache_rows[real], slots[real], positions[real]
        cache.key_mask[token_rows, token_slots] = True
        span = int(slots.max()) + 1
        mask = cache.attention_mask(rows, slots, span)
        cos, sin = rotary[0][token_positions][:, None], rotary[1][token_positions][:, None]
        shared_slots = slice(int(slots[0, 0]), span) if shared and real is None else None
        return cls(real, rows, token_rows, token_slots, cos, sin, mask, span, (batch, length), shared_slots)

    def store(self, cache: KVCache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the new tokens' keys and values [N, H_kv, head_dim] into `cache`'s layer."""
        if self.shared_slots is None:
            cache.write(layer, self.token_rows, self.token_slots, keys, values)
        else:
            cache.write(layer, self.rows, self.shared_slots, self.to_grid(keys).transpose(1, 2),
                        self.to_grid(values).transpose(1, 2))

    def to_grid(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at padding."""
        if self.real is None:
            return packed.view(*self.grid, *packed.shape[1:])
        out = packed.new_zeros(*self.grid, *packed.shape[1:])
        out[self.real] = packed
        return out

    def to_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...], padding dropped."""
        if self.real is None:
            return grid.reshape(-1, *grid.shape[2:])
        return grid[self.real]


class LlamaDecoder:
    """The modules of a Llama-family causal LM that decoding calls, and its attention shapes
    (heads H, key-value heads H_kv, head_dim)."""

    def __init__(self, model):
        self.body = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.fused_step: DecoderStep | object | None = UNCHECKED  # the one-call step while decoding

    @staticmethod
    def supports(model) -> bool:
        """Whether this step computes what the model's forward does: the Llama family, full
        attention (a sliding window would need its own mask)."""
        config = model.config
        sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
        return config.model_type in LLAMA_FAMILY and not sliding

    def forget_step(self) -> None:
        """A new prefill (a generation, a slot's admission): build the one-call step again from
        the model as it is at the next decoding step (engine.decoder_kernel)."""
        self.fused_step = UNCHECKED

    @property
    def layers(self):
        return self.body.layers

    def empty_cache(self, rows: int, slots: int, like: torch.Tensor) -> KVCache:
        """A zeroed KVCache of `rows` x `slots` in the dtype and device of `like`."""
        return KVCache.empty(len(self.layers), rows, self.kv_heads, slots, self.head_dim, like)

    def rotary_table(self, positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [positions, head_dim] from the model's rotary embedding (its scaling included)."""
        cos, sin = self.body.rotary_emb(like, torch.arange(positions)[None])
        return cos[0], sin[0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [...] -> embeddings [..., D]."""
        return self.body.embed_tokens(token_ids)

    def run(self, hidden: torch.Tensor, cache: KVCache, layout: TokenLayout) -> torch.Tensor:
        """hidden [N, D] of the new tokens -> the last layer's output [N, D] (before the final
        norm); writes each layer's keys and values into `cache`. A fusion call running
        (`fusion.context`) gets its block before each layer; its hooks run in the step.
        One new token per row outside a fusion call runs as one C call where it covers the
        model (`engine.decoder_kernel`), the same arithmetic as the eager layers; whether it
        does is decided at the first such step after each prefill (`forget_step`)."""
        fusion_call = current()
        if layout.grid[1] != 1 or layout.real is not None:
            self.forget_step()  # a prefill or an admission: look at the model again at the next step
        elif fusion_call is None and steps_enabled():
            if self.fused_step is UNCHECKED:
                self.fused_step = decoder_step(self)  # every layer in one C call, where it covers the model
            if (self.fused_step is not None and self.fused_step.covers(len(hidden))
                    and hidden.dtype == cache.keys[0].dtype == torch.float32):
                return run_step(self.fused_step, hidden, cache, layout)
        for index, layer in enumerate(self.layers):
            if fusion_call is not None:
                hidden = fusion_call.state.fusion.before_layer(index, hidden)
            hidden = decoder_layer_step(self, layer, index, hidden, cache, layout)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output [B, D] -> next-token logits [B, V]. While a float32 model
        decodes in one C call, its LM head runs on the same float32 product."""
        normed = rms_norm(self.body.norm, hidden)
        step = self.fused_step
        if isinstance(step, DecoderStep) and step.kind == "float32" and step.covers(len(hidden)):
            plan = head_plan(self)
            if plan is not None:
                return plan(normed.contiguous())
        return self.lm_head(normed)


def decoder_layer_step(decoder: LlamaDecoder, layer, index: int, hidden: torch.Tensor, cache: KVCache,
                       layout: TokenLayout) -> torch.Tensor:
    """One Llama decoder layer (`index` of the model) for the new tokens hidden [N, D] -> [N, D].

    Pre-norm attention with rotary queries and keys (grouped-query when H_kv < H), whose
    keys and values go to `cache` at the layout's slots before attention reads the rows'
    cache, then the pre-norm MLP; each with its residual, as transformers'
    `LlamaDecoderLayer`.
    """
    attention, heads, kv_heads, head_dim = layer.self_attn, decoder.heads, decoder.kv_heads, decoder.head_dim
    normed = rms_norm(layer.input_layernorm, hidden)
    # one kernel call for the three where they are quantized (polymodal.quantization.project)
    query, key, value = project(normed, (attention.q_proj, attention.k_proj, attention.v_proj))
    both = torch.cat([query.view(-1, heads, head_dim), key.view(-1, kv_heads, head_dim)], dim=1)
    both = both * layout.cos + rotate_half(both) * layout.sin  # queries and keys rotated in one go: [N, H + H_kv, hd]
    value = value.view(-1, kv_heads, head_dim)
    layout.store(cache, index, both[:, heads:], value)
    keys, values = cache.read(index, layout.rows, layout.span)  # [B, H_kv, span, hd]
    out = F.scaled_dot_product_attention(
        layout.to_grid(both[:, :heads]).transpose(1, 2), keys, values,
        attn_mask=layout.mask, enable_gqa=kv_heads != heads,
    )  # [B, H, T, hd]
    hidden = hidden + attention.o_proj(layout.to_tokens(out.transpose(1, 2)).reshape(len(hidden), -1))
    return hidden + mlp_step(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden))


def mlp_step(mlp, normed: torch.Tensor) -> torch.Tensor:
    """The layer's gated MLP on normed [N, D] -> [N, D]: down(act(gate(x)) * up(x)), as
    transformers' LlamaMLP, with gate and up in one kernel call where both are quantized;
    any other MLP module (a fusion's experts) runs as itself."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not isinstance(gate, (Int8Linear, Int4Linear)) or not hasattr(mlp, "act_fn"):
        return mlp(normed)
    gated, upward = project(normed, (gate, up))
    return mlp.down_proj(mlp.act_fn(gated) * upward)
