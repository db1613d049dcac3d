"""`vit`: a small vision transformer trained from scratch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

from polymodal.config import EncoderConfig
from polymodal.encoders.base import Encoder, PixelNormalize
from polymodal.encoders.patches import patch_count, patchify
from polymodal.errors import ConfigError
from polymodal.registry import register_encoder


@dataclass
class VitEncoderConfig(EncoderConfig):
    kind: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    # SigLIP/Idefics3's towers use the tanh approximation ("gelu_pytorch_tanh") and eps 1e-6;
    # the defaults are PyTorch's, which the models trained before these options used.
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    layer_norm_eps: float = 1e-5


# "gelu" stays the string PyTorch's fast path recognises; the tanh form is GELU's
# approximation (Hendrycks & Gimpel 2016), transformers' "gelu_pytorch_tanh".
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": partial(functional.gelu, approximate="tanh")}


@register_encoder("vit", config=VitEncoderConfig)
class VitEncoder(Encoder):
    """A ViT from scratch: patch embedding, learned positions, pre-norm transformer blocks,
    a final LayerNorm. The layout of SigLIP's vision tower as Idefics3/SmolVLM use it (Zhai et
    al. 2023; transformers' `Idefics3VisionTransformer`): the linear patch embedding is its
    Conv2d, `in_proj` its q/k/v, the final norm its post-layernorm (polymodal.interop.idefics3)."""

    def __init__(self, config: VitEncoderConfig, loader=None, key: str = "encoder"):
        super().__init__()
        self.num_tokens = patch_count(config.image_size, config.patch_size, key)
        if config.width % config.heads:
            raise ConfigError(f"{key}.heads: {config.heads} does not divide width {config.width}")
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.out_dim = config.width
        self.normalize = PixelNormalize((0.5,) * 3, (0.5,) * 3)
        self.patch_embed = nn.Linear(3 * config.patch_size**2, config.width)
        self.position = nn.Parameter(torch.randn(1, self.num_tokens, config.width) * 0.02)
        block = nn.TransformerEncoderLayer(
            config.width, config.heads, int(config.width * config.mlp_ratio),
            dropout=0.0, activation=_ACTIVATIONS[config.activation], batch_first=True, norm_first=True,
            layer_norm_eps=config.layer_norm_eps,
        )
        self.blocks = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, (H/p)*(W/p), width]."""
        tokens = self.patch_embed(patchify(self.normalize(pixels), self.patch_size))
        return self.norm(self.blocks(tokens + self.position))
