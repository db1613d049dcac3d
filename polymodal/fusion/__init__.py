"""Fusion: how connector tokens reach the LLM.

`inline` (LLaVA) puts them in the text's input embeddings. The other kinds work inside the
decoder's layers through forward hooks and a per-call context (`fusion.base`,
`fusion.context`; design.md, "Fusion inside the decoder"): `cross_attention` (Flamingo),
`adapter` (LLaMA-Adapter v2), `expert` (CogVLM, and P-LoRA), `moe` (mixture of experts).
"""

from __future__ import annotations

from torch import nn

from polymodal.config import FusionConfig
from polymodal.fusion.adapter import AdapterFusion, AdapterFusionConfig
from polymodal.fusion.base import DecoderFusion
from polymodal.fusion.cross_attention import CrossAttentionFusion, CrossAttentionFusionConfig
from polymodal.fusion.expert import ExpertFusion, ExpertFusionConfig
from polymodal.fusion.inline import InlineFusion, InlineFusionConfig, scatter_media
from polymodal.fusion.moe import MoEFusion, MoEFusionConfig
from polymodal.registry import FUSIONS

__all__ = ["AdapterFusion", "AdapterFusionConfig", "CrossAttentionFusion", "CrossAttentionFusionConfig", "DecoderFusion", "ExpertFusion", "ExpertFusionConfig", "InlineFusion", "InlineFusionConfig", "MoEFusion", "MoEFusionConfig", "build_fusion", "scatter_media"]


def build_fusion(config: FusionConfig) -> nn.Module:
    return FUSIONS.get(config.kind).builder(config)
