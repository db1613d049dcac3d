"""`adapter` fusion: LLaMA-Adapter's zero-initialised attention over learned prompts in the top
layers, with the image's global feature added to the prompts (LLaMA-Adapter V2).

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention" (OpenGVLab/LLaMA-Adapter, llama/model.py `Attention.forward`), and Gao et al.
2023, "LLaMA-Adapter V2". In each of the top L layers, every token's query also attends to
`prompt_length` learned prompt vectors (keys and values from the layer's own `k_proj` and
`v_proj`), softmaxed on their own, and the result is added to the attention output through a
per-head gate that starts at zero: a fresh model is the plain LLM, and training opens the
gates. The image reaches the prompts as its global feature (the mean of its connector
tokens [D]) added to every prompt; a token reads the latest image at or before it (none
before the first: the prompts alone).

Hooks: `q_proj` leaves the layer's queries [N, H * head_dim] in the call's scratch and a
pre-hook on `o_proj` adds the gated prompt attention to its input. The queries are taken before
the rotary embedding (the reference rotates them; the prompts carry no position either way).
The prompts' keys and values are computed once per request, for each row and image, and kept
in the state (`adapter.LAYER`: [R, 1 + M, prompt_length, 2, H_kv, head_dim]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import FusionConfig
from polymodal.errors import UserError
from polymodal.fusion.base import DecoderFusion, decoder_layers
from polymodal.fusion.context import FusionCall
from polymodal.registry import register_fusion


@dataclass
class AdapterFusionConfig(FusionConfig):
    kind: str = "adapter"
    layers: int = 8  # the top L layers get prompts (LLaMA-Adapter: 30 of LLaMA-7B's 32)
    prompt_length: int = 10  # learned prompts per layer (the paper's K = 10)
    visual: bool = True  # add the image's global feature to the prompts (V2)


@register_fusion("adapter", config=AdapterFusionConfig)
class AdapterFusion(DecoderFusion):
    """LLaMA-Adapter V2: zero-gated attention over learned prompts in the top layers, plus the image.

    Prompts `prompts[i]` [prompt_length, D] and gates `gates[i]` [H] (zeros) for the i-th
    adapted layer, from the bottom of the top L layers."""

    def __init__(self, config: AdapterFusionConfig | None = None):
        super().__init__()
        self.config = config or AdapterFusionConfig()
        if self.config.layers < 1 or self.config.prompt_length < 1:
            raise UserError(f"model.fusion: layers ({self.config.layers}) and prompt_length "
                            f"({self.config.prompt_length}) must be at least 1")
        self.prompts, self.gates = nn.ParameterList(), nn.ParameterList()
        self.layer_indices: list[int] = []

    def text_tokens_per_medium(self, connector_tokens: int) -> int:
        return 1  # one placeholder marks where the image stands; its tokens reach the prompts

    def attach(self, llm_model: nn.Module) -> None:
        layers, config = decoder_layers(llm_model), llm_model.config
        if self.config.layers > len(layers):
            raise UserError(f"model.fusion.layers: {self.config.layers} is more than this LLM's "
                            f"{len(layers)} layers")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        generator = torch.Generator().manual_seed(0)
        for index in range(len(layers) - self.config.layers, len(layers)):
            position = len(self.layer_indices)
            self.layer_indices.append(index)
            prompt = torch.randn(self.config.prompt_length, config.hidden_size, generator=generator) * 0.02
            self.prompts.append(nn.Parameter(prompt))
            self.gates.append(nn.Parameter(torch.zeros(heads)))
            attention = layers[index].self_attn
            self.hook_output(attention.q_proj, _keep_queries)
            self.hook_input(attention.o_proj, self._prompt_attention(position, attention, heads, head_dim))

    def _prompt_attention(self, position: int, attention: nn.Module, heads: int, head_dim: int):
        """The o_proj pre-hook of adapted layer `position`: attention output [.., H * hd] +
        tanh(gate) x softmax(q k_prompt / sqrt(hd)) v_prompt."""
        def apply(fusion_call: FusionCall, attended: torch.Tensor) -> torch.Tensor:
            queries = fusion_call.scratch.pop("queries").reshape(-1, heads, head_dim)  # [N, H, hd]
            keys, values = self._prompt_keys_values(fusion_call, position, attention, head_dim)
            scores = torch.einsum("nhd,nlhd->nhl", queries, keys.to(queries.dtype)) / head_dim ** 0.5
            out = torch.einsum("nhl,nlhd->nhd", scores.softmax(-1), values.to(queries.dtype))
            gated = torch.tanh(self.gates[position]).to(out.dtype)[None, :, None] * out  # [N, H, hd]
            return attended + gated.reshape(attended.shape)
        return apply

    def _prompt_keys_values(self, fusion_call: FusionCall, position: int, attention: nn.Module,
                            head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's prompt keys and values [N, prompt_length, H, hd] (key-value heads
        repeated for grouped-query attention), from the state's per-request cache."""
        state, name = fusion_call.state, f"adapter.{self.layer_indices[position]}"
        if name not in state.cache:
            prompts = self._prompts(state, position)  # [R, 1 + M, L, D]
            keys = attention.k_proj(prompts).unflatten(-1, (-1, head_dim))  # [R, 1 + M, L, H_kv, hd]
            values = attention.v_proj(prompts).unflatten(-1, (-1, head_dim))
            state.cache[name] = torch.stack([keys, values], dim=3)  # [R, 1 + M, L, 2, H_kv, hd]
        both = state.cache[name][fusion_call.token_rows, fusion_call.token_media_index + 1]  # [N, L, 2, H_kv, hd]
        repeat = self.gates[position].shape[0] // both.shape[-2]
        both = both.repeat_interleave(repeat, dim=-2) if repeat > 1 else both
        return both[:, :, 0], both[:, :, 1]

    def _prompts(self, state, position: int) -> torch.Tensor:
        """[R, 1 + M, L, D]: index 0 the prompts alone (no image yet), 1 + m with image m's
        global feature added (zeros for rows with fewer images)."""
        prompt = self.prompts[position]
        rows = state.rows
        alone = prompt.expand(rows, 1, *prompt.shape)
        if state.media is None or not self.config.visual:
            return alone
        feature = state.media.mean(dim=2).to(prompt.dtype)  # [R, M, D]: each image's global feature
        return torch.cat([alone, prompt + feature[:, :, None]], dim=1)


def _keep_queries(fusion_call: FusionCall, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    fusion_call.scratch["queries"] = output
    return output
