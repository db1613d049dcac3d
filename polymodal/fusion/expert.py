"""`expert` fusion: image positions run on weights of their own (CogVLM's visual expert), or on
the LLM's weights plus low-rank deltas of their own (InternLM-XComposer2's Partial LoRA).

CogVLM (Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language Models";
THUDM/CogVLM, `VisionExpertAttention` and `VisionExpertMLP`) gives the image tokens, kept
inline as in LLaVA, a copy of every layer's query/key/value projections, output projection
and MLP, initialised from the LLM's, and trains the copies alone; text tokens keep the frozen
LLM, so text-only prompts give the base LLM's answers exactly. With `rank` > 0 the copies are
replaced by LoRA-shaped deltas on the same calls, applied only at image positions (P-LoRA,
Dong et al. 2024, "InternLM-XComposer2"): the B matrices start at zero, so a fresh model is
the plain LLM.

Through forward hooks on `q_proj`, `k_proj`, `v_proj`, `o_proj` and `mlp` (fusion.base): the
LLM's module computes every token, and the hook replaces (full copies) or corrects (P-LoRA)
the image positions' outputs. No modeling file is forked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from polymodal.config import FusionConfig
from polymodal.errors import UserError
from polymodal.fusion.base import DecoderFusion, decoder_layers, replace_at
from polymodal.registry import register_fusion

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ExpertFusionConfig(FusionConfig):
    kind: str = "expert"
    rank: int = 0  # 0: full copies of the modules (CogVLM); r > 0: image-only LoRA of rank r (P-LoRA)
    alpha: int = 0  # P-LoRA scale alpha / rank (0: alpha = 2 x rank, as the LoRA recipes here)
    modules: list[str] = field(default_factory=lambda: [*PROJECTIONS, "mlp"])  # which calls get experts
    layers: list[int] | None = None  # None: every layer


class LowRankDelta(nn.Module):
    """x [n, D_in] -> scale * B(A(x)) [n, D_out]; B starts at zero (LoRA, Hu et al. 2021)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale


@register_fusion("expert", config=ExpertFusionConfig)
class ExpertFusion(DecoderFusion):
    """CogVLM visual experts (or P-LoRA deltas) at image positions; text runs the LLM untouched.

    Image tokens are inline (K placeholders each, as LLaVA), and at their positions each
    hooked call's output comes from the expert's weights.

    Children: `experts[layer][module]`, a deep copy of the LLM's module (rank 0) or a
    `LowRankDelta` (rank > 0), keyed by layer index and module name.
    """

    fills_placeholders = True
    uses_media_tokens = False

    def __init__(self, config: ExpertFusionConfig | None = None):
        super().__init__()
        self.config = config or ExpertFusionConfig()
        unknown = sorted(set(self.config.modules) - {*PROJECTIONS, "mlp"})
        if unknown:
            raise UserError(f"model.fusion.modules: {unknown[0]!r} is not one of "
                            f"{', '.join([*PROJECTIONS, 'mlp'])}")
        self.experts = nn.ModuleDict()

    def attach(self, llm_model: nn.Module) -> None:
        layers = decoder_layers(llm_model)
        rank = self.config.rank
        scale = (self.config.alpha or 2 * rank) / rank if rank else 1.0
        for index in self.config.layers if self.config.layers is not None else range(len(layers)):
            layer, experts = layers[index], nn.ModuleDict()
            for name in self.config.modules:
                module = layer.mlp if name == "mlp" else getattr(layer.self_attn, name)
                experts[name] = _expert_of(module, rank, scale)
                self.hook_output(module, _replace_media(experts[name], residual=rank > 0))
            self.experts[str(index)] = experts


def _expert_of(module: nn.Module, rank: int, scale: float) -> nn.Module:
    """A copy of the LLM's module (its base layer under peft, without adapters), or a delta."""
    if rank == 0:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        expert = copy.deepcopy(base)
        expert.requires_grad_(True)
        return expert
    if isinstance(module, nn.Linear) or hasattr(module, "get_base_layer"):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return LowRankDelta(base.in_features, base.out_features, rank, scale)
    hidden = module.gate_proj.in_features  # a Llama-family MLP: D -> D
    return LowRankDelta(hidden, hidden, rank, scale)


def _replace_media(expert: nn.Module, residual: bool):
    """The hook body: at media positions, output = expert(input) (a copy), or output +
    expert(input) (a low-rank delta)."""
    def apply(fusion_call, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        mask = fusion_call.token_media_mask
        if residual:
            flat = output.reshape(-1, output.shape[-1])
            return replace_at(mask, output, lambda x: flat[mask] + expert(x).to(flat.dtype), inputs)
        return replace_at(mask, output, expert, inputs)
    return apply
