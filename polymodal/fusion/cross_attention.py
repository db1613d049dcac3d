"""`cross_attention` fusion (Flamingo): gated cross-attention blocks before frozen decoder layers
read each image's connector tokens; the text holds one placeholder per image.

Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning") and
open_flamingo (`open_flamingo/src/helpers.py`: `GatedCrossAttentionBlock`, `MaskedCrossAttention`,
`FeedForward`; `flamingo_lm.py`: the block runs before the wrapped layer) insert, before every
N-th layer of a frozen LLM, a block

    x = x + tanh(attention_gate) * CrossAttention(LayerNorm(x), media)
    x = x + tanh(feed_forward_gate) * FeedForward(LayerNorm(x))

with both gates initialised at 0, so a fresh model is the plain LLM. The media are the Perceiver
Resampler's tokens (`connector: {kind: perceiver}`), never normalised again (open_flamingo).

Media masking (open_flamingo's `only_attend_immediate_media`): a token reads only the latest
image at or before it (the image's own placeholder included), or, with
`only_attend_immediate_media: false`, every image at or before it. Where this differs from
open_flamingo: a token with no image before it passes the whole block unchanged (open_flamingo
zeroes its attention but still runs the feed-forward on it), so the text before the first image,
and any text-only prompt, gives exactly the plain LLM's hidden states, trained or not.

The media keys and values are computed once per request (mllama's cross-attention cache; open_flamingo
and Idefics recompute them for every decoded token): when the request's state is made
(`new_state`, in `MultimodalLM.prepare`), into the state's `cache` under `cross_attention.<layer>`
as [R, M x K, 2 x inner] (image m's K tokens at m K .. m K + K - 1; a text-only state holds
[R, 0, 2 x inner]), so every state carries them and the server's `put_row` pads and keeps them
(a request joining running ones costs only its own). Nothing is stored on the modules between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import FusionConfig
from polymodal.errors import UserError
from polymodal.fusion.base import DecoderFusion, decoder_layers
from polymodal.fusion.context import FusionCall, FusionState, current
from polymodal.registry import register_fusion


@dataclass
class CrossAttentionFusionConfig(FusionConfig):
    kind: str = "cross_attention"
    # A block before layers every-1, 2*every-1, ... (open_flamingo's cross_attn_every_n_layers:
    # the layers whose (index + 1) % every == 0); 1: before every layer.
    every: int = 4
    heads: int = 0  # attention heads of each block; 0: the LLM's (head width = hidden size / heads)
    ff_mult: int = 4  # the feed-forward's inner width, in multiples of the LLM's hidden size
    # False: a token reads every image at or before it (in shared-prefix training rows,
    # `share_prefix`, that includes a neighbouring branch's earlier images: keep True there).
    only_attend_immediate_media: bool = True


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block on hidden states [B, T, D] and media keys and
    values [B, M x K, 2 x inner] (`keys_values` of the media tokens [B, M, K, D_media]).

    Children: `attention_norm`, `query` (D -> inner), `key_value` (D_media -> 2 x inner, keys then
    values), `output` (inner -> D), `attention_gate` [1]; `feed_forward` (LayerNorm, D -> ff_mult x D,
    GELU, -> D), `feed_forward_gate` [1]. Gates start at 0: the block is the identity.
    """

    def __init__(self, dim: int, media_dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        inner = heads * self.head_dim
        self.attention_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, inner, bias=False)
        self.key_value = nn.Linear(media_dim, 2 * inner, bias=False)
        self.output = nn.Linear(inner, dim, bias=False)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                          nn.Linear(ff_mult * dim, dim, bias=False))
        self.feed_forward_gate = nn.Parameter(torch.zeros(1))

    def keys_values(self, media: torch.Tensor) -> torch.Tensor:
        """media tokens [n, M, K, D_media] -> keys and values [n, M x K, 2 x inner]."""
        return self.key_value(media.to(self.key_value.weight.dtype)).flatten(1, 2)

    def forward(self, hidden: torch.Tensor, keys_values: torch.Tensor, allowed: torch.Tensor,
                has_image: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], keys_values [B, M x K, 2 x inner], allowed [B, 1, T, M x K] bool (the
        keys each token reads, `media_attention_mask`), has_image [B, T, 1] (1.0 where a token has
        an image at or before it, else 0.0: the block leaves it unchanged) -> [B, T, D]."""
        batch, length, _ = hidden.shape
        query = self.query(self.attention_norm(hidden)).view(batch, length, self.heads, self.head_dim)
        keys, values = keys_values.view(batch, -1, 2, self.heads, self.head_dim).unbind(2)
        attended = F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2).to(query.dtype),
                                                  values.transpose(1, 2).to(query.dtype), attn_mask=allowed)
        attended = self.output(attended.transpose(1, 2).reshape(batch, length, -1))  # [B, T, D]
        hidden = hidden + torch.tanh(self.attention_gate) * attended * has_image
        return hidden + torch.tanh(self.feed_forward_gate) * self.feed_forward(hidden) * has_image


def media_attention_mask(media_index: torch.Tensor, width: int, per_image: int,
                         immediate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """media_index [B, T] (the latest image at or before each token, -1 for none), the keys'
    width M x K (K = per_image) -> (allowed [B, 1, T, M x K] bool, has_image [B, T, 1] float).

    A token reads the keys of image media_index (immediate: open_flamingo's
    only_attend_immediate_media) or of images 0..media_index. A token with no image is allowed
    every key (no all-masked softmax row, no NaN in the backward) and has_image 0 drops its result.
    """
    key_image = torch.arange(width, device=media_index.device) // per_image  # [M K]
    index = media_index[..., None]
    has_image = index >= 0  # [B, T, 1]
    allowed = (key_image == index if immediate else key_image <= index) | ~has_image  # [B, T, M K]
    return allowed[:, None], has_image.float()


@register_fusion("cross_attention", config=CrossAttentionFusionConfig)
class CrossAttentionFusion(DecoderFusion):
    """Flamingo's gated cross-attention before every `every`-th layer (see the module docstring).

    One placeholder per image in the text (its embedding is the placeholder token's); the
    connector's K tokens of each image [R, M, K, D] reach the blocks through the fusion state.
    Children: `blocks[str(layer)]`, a `GatedCrossAttentionBlock` before that layer.
    """

    fills_placeholders = False
    uses_media_tokens = True

    def __init__(self, config: CrossAttentionFusionConfig | None = None):
        super().__init__()
        self.config = config or CrossAttentionFusionConfig()
        if self.config.every < 1:
            raise UserError(f"model.fusion.every: {self.config.every} must be 1 or more (a block before "
                            f"every N-th layer)")
        if self.config.ff_mult < 1:
            raise UserError(f"model.fusion.ff_mult: {self.config.ff_mult} must be 1 or more")
        self.blocks = nn.ModuleDict()

    def text_tokens_per_medium(self, connector_tokens: int) -> int:
        return 1

    def attach(self, llm_model: nn.Module) -> None:
        """A block before each layer (index + 1) % every == 0, sized from the LLM's config; a
        pre-hook runs it in transformers' own loop (the runners call `before_layer`)."""
        layers, config = decoder_layers(llm_model), llm_model.config
        chosen = [index for index in range(len(layers)) if (index + 1) % self.config.every == 0]
        if not chosen:
            raise UserError(f"model.fusion.every: {self.config.every} puts no block in an LLM of "
                            f"{len(layers)} layers")
        dim = config.hidden_size
        heads = self.config.heads or config.num_attention_heads
        if heads < 1 or dim % heads:
            raise UserError(f"model.fusion.heads: {heads} heads do not divide the LLM's hidden size {dim}")
        for index in chosen:
            dtype = next(layers[index].parameters()).dtype
            self.blocks[str(index)] = GatedCrossAttentionBlock(dim, dim, heads, self.config.ff_mult).to(dtype)
            self.hook_layer_input(layers[index], index)

    def _masks(self, fusion_call: FusionCall) -> dict:
        """The call's media masks, the same for every block (`media_attention_mask`), and
        whether it runs every state row in order; {} when no token has an image."""
        media_index, state = fusion_call.media_index, fusion_call.state
        if not bool((media_index >= 0).any()):
            return {}
        rows = fusion_call.rows
        per_image = state.media.shape[2]
        width = state.media.shape[1] * per_image  # the cached keys' M x K (put_row pads both alike)
        allowed, has_image = media_attention_mask(media_index, width, per_image,
                                                  self.config.only_attend_immediate_media)
        every_row = len(rows) == state.rows and bool((rows == torch.arange(state.rows)).all())
        return {"allowed": allowed, "has_image": has_image, "every_row": every_row}

    def new_state(self, media: torch.Tensor | None, media_count: torch.Tensor, placeholder_ids: list[int],
                  image_id: int, tokens_per_medium: int) -> FusionState:
        """The rows' state (media [R, M, K, D] or None), with every block's media keys and values
        in its cache: [R, M x K, 2 x inner], or [R, 0, 2 x inner] for text-only rows."""
        state = super().new_state(media, media_count, placeholder_ids, image_id, tokens_per_medium)
        for index, block in self.blocks.items():
            state.cache[f"cross_attention.{index}"] = (
                block.keys_values(media) if media is not None else
                torch.zeros(len(media_count), 0, block.key_value.out_features, dtype=block.key_value.weight.dtype))
        return state

    def before_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] (transformers' loop) or [N, D] (the runners' packed tokens) entering
        layer `index` -> the same shape, through its block when it has one and a call with
        images is running."""
        fusion_call = current()
        key = str(index)
        if fusion_call is None or key not in self.blocks or fusion_call.state.media is None:
            return hidden
        masks = fusion_call.scratch.get("cross_attention")  # the call's masks, made at its first block
        if masks is None:
            masks = fusion_call.scratch["cross_attention"] = self._masks(fusion_call)
        if not masks:  # no token has an image yet: the plain LLM
            return hidden
        block = self.blocks[key]
        keys_values = media_keys_values(fusion_call, f"cross_attention.{index}", block, masks["every_row"])
        allowed, has_image = masks["allowed"], masks["has_image"]
        out = block(fusion_call.to_grid(hidden), keys_values, allowed, has_image.to(hidden.dtype))
        return fusion_call.from_grid(out, hidden)


def media_keys_values(fusion_call: FusionCall, name: str, block: GatedCrossAttentionBlock,
                      every_row: bool) -> torch.Tensor:
    """The keys and values [B, M x K, 2 x inner] of the call's rows from `state.cache[name]`
    [R, M x K, 2 x inner] (`new_state` fills it; a state that lost it, merged with one made
    elsewhere, gets it again for every row here). every_row: the call runs all R rows in order
    (no copy)."""
    state = fusion_call.state
    if name not in state.cache:
        state.cache[name] = block.keys_values(state.media)
    return state.cache[name] if every_row else state.cache[name][fusion_call.rows]
