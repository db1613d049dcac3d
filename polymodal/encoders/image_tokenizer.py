"""The image tokenizer: a small convolutional autoencoder whose latent grid is quantised by
finite scalar quantisation (FSQ) into discrete codes, pixels -> codes -> pixels.

Why FSQ (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024) and
not a VQ-VAE's learned codebook (van den Oord et al., 2017): each latent channel is bounded
and rounded to one of a few fixed levels, so the codebook is implicit (the grid of level
combinations). Nothing can collapse (a VQ-VAE's unused codebook rows get no gradient and
die), and there is no commitment loss, codebook loss or EMA update to tune: the loss is the
reconstruction's alone, gradients pass the rounding straight through. The quantiser is
`vector_quantize_pytorch.FSQ` (lucidrains/vector-quantize-pytorch).

Kind `continuous` drops the quantiser: `latent_dim` tanh-bounded floats per grid cell (the
latents MAR's flow head predicts; Li et al., 2024). Trained by `objective: autoencoder`.

Example:
    tokenizer = ImageTokenizer(ImageTokenizerConfig())  # 64x64 -> 8x8 = 64 codes of 1000
    codes = tokenizer.encode(pixels)  # [N, 64] int64 in [0, 1000)
    pixels = tokenizer.decode(codes)  # [N, 3, 64, 64] in [0, 1]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polymodal.config import ImageTokenizerConfig
from polymodal.errors import UserError


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide `channels` (batch-independent, unlike
    BatchNorm: a tokenizer gives each image the same codes whatever else is in its batch)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))): [N, C, H, W] -> [N, C, H, W] (the pre-norm
    block of the VQGAN/LDM autoencoders, Esser et al., 2021)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_encoder(channels: list[int], out_channels: int) -> nn.Sequential:
    """Pixels [N, 3, S, S] in [-1, 1] -> latents [N, out_channels, S/2^h, S/2^h]: a 3x3 stem,
    one stride-2 conv (GroupNorm, SiLU) per width in `channels` (h halvings), a residual
    block at the lowest resolution, a 1x1 conv to the latent channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
    previous = channels[0]
    for width in channels:
        layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1), group_norm(width), nn.SiLU()]
        previous = width
    layers += [ResidualBlock(previous), group_norm(previous), nn.SiLU(), nn.Conv2d(previous, out_channels, 1)]
    return nn.Sequential(*layers)


def conv_decoder(channels: list[int], in_channels: int) -> nn.Sequential:
    """The encoder's mirror: latents [N, in_channels, g, g] -> pixel logits [N, 3, g*2^h, g*2^h]:
    a 3x3 conv in, a residual block, then per width (reversed) a nearest 2x upsampling and a
    3x3 conv (GroupNorm, SiLU), a 3x3 conv to RGB."""
    widths = channels[::-1]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), ResidualBlock(widths[0])]
    previous = widths[0]
    for width in [*widths[1:], channels[0]]:
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(previous, width, 3, padding=1),
                   group_norm(width), nn.SiLU()]
        previous = width
    layers.append(nn.Conv2d(previous, 3, 3, padding=1))
    return nn.Sequential(*layers)


class GlobalTokens(nn.Module):
    """A 1-D tokenization's bottleneck (TiTok, Yu et al., 2024): grid features [N, c, g, g]
    -> K global latents [N, K, d] through an MLP over the whole grid, and back. Every latent
    reads every cell, so a code can carry what the image shows (a shape, a colour, where it
    sits) rather than what one cell shows. TiTok reads the grid with a ViT's learned latent
    tokens; on 8x8 grids a two-layer MLP does the same reading for a fraction of the cost."""

    def __init__(self, grid_channels: int, grid_side: int, tokens: int, latent_dim: int, width: int):
        super().__init__()
        self.shape = (grid_channels, grid_side, grid_side)
        self.tokens, self.latent_dim = tokens, latent_dim
        features = grid_channels * grid_side**2
        self.to_tokens = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, tokens * latent_dim))
        self.from_tokens = nn.Sequential(nn.Linear(tokens * latent_dim, width), nn.SiLU(), nn.Linear(width, features))

    def encode(self, grid: torch.Tensor) -> torch.Tensor:
        """[N, c, g, g] -> [N, K, d] (unbounded: the quantiser or tanh bounds them)."""
        return self.to_tokens(grid.flatten(1)).view(len(grid), self.tokens, self.latent_dim)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, K, d] -> [N, c, g, g] (channels-last, as the convolutions prefer)."""
        grid = self.from_tokens(latents.flatten(1)).view(len(latents), *self.shape)
        return grid.contiguous(memory_format=torch.channels_last)


class ImageTokenizer(nn.Module):
    """Pixels [N, 3, S, S] in [0, 1] <-> K = (S / downsample)^2 codes per image (raster order).

    Kind `fsq`: d = len(levels) latent channels, each bounded and rounded to its levels;
    codebook_size = prod(levels) (1000 for [8, 5, 5, 5]). Kind `continuous`: d = latent_dim
    tanh-bounded floats per cell, no codes (codebook_size 0). With `config.tokens`, K = tokens
    global latents (`GlobalTokens`, a 1-D tokenization) instead of one per cell.

    `config` is checked when built (ImageTokenizerConfig: one conv width per halving).

    Raises:
        UserError: pixels not [N, 3, image_size, image_size] (the message names the size).
    """

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = config
        self.kind = config.kind
        self.image_size = config.image_size
        self.grid_side = config.image_size // config.downsample
        self.quantizer = None
        if config.kind == "fsq":
            from vector_quantize_pytorch import FSQ

            # FSQ's default bound needs levels of 3 or more; its symmetric variant takes 2 too.
            self.quantizer = FSQ(list(config.levels), preserve_symmetry=any(level == 2 for level in config.levels))
            self.latent_dim = len(config.levels)
            self.codebook_size = math.prod(config.levels)
        else:
            self.latent_dim = config.latent_dim
            self.codebook_size = 0
        # 1-D: the convolutions meet the MLP at a grid of 16 channels (8x8 x 16 = 1024 features).
        grid_channels = self.latent_dim if config.tokens is None else 16
        self.encoder = conv_encoder(config.channels, grid_channels)
        self.decoder = conv_decoder(config.channels, grid_channels)
        self.global_tokens = None if config.tokens is None else GlobalTokens(
            grid_channels, self.grid_side, config.tokens, self.latent_dim, config.token_width)
        # Channels-last convolutions: a training step of 16 images took 0.127 s against
        # 0.159 s on this 2-core CPU (oneDNN's preferred layout; the values are the same).
        self.to(memory_format=torch.channels_last)

    @property
    def num_codes(self) -> int:
        """K: codes (tokens) per image, the latent grid's cells or the 1-D tokens."""
        return self.config.num_codes

    # ------------------------------------------------------------ pixels -> latents -> codes

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """UserError unless `pixels` is [N, 3, image_size, image_size]."""
        size = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise UserError(f"the image tokenizer takes RGB images of {size}x{size} pixels "
                            f"([N, 3, {size}, {size}]), got {list(pixels.shape)}")

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, S, S] in [0, 1] -> latents [N, K, d] in [-1, 1]: for fsq the quantised
        values (d = len(levels); gradients pass the rounding straight through), for continuous
        the tanh-bounded latents (d = latent_dim)."""
        self.check_pixels(pixels)
        inputs = (pixels * 2 - 1).contiguous(memory_format=torch.channels_last)
        features = self.encoder(inputs)  # [N, d or 16, g, g]
        if self.global_tokens is None:
            latents = features.flatten(2).transpose(1, 2)  # [N, K, d], raster order
        else:
            latents = self.global_tokens.encode(features)  # [N, K, d], K global tokens
        if self.quantizer is None:
            return torch.tanh(latents)
        quantized, _ = self.quantizer(latents.float())
        return quantized.to(latents.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, K, d] -> pixels [N, 3, S, S] in [0, 1] (a sigmoid on the decoder's output)."""
        if latents.dim() != 3 or tuple(latents.shape[1:]) != (self.num_codes, self.latent_dim):
            raise ValueError(f"latents: expected [N, {self.num_codes}, {self.latent_dim}], got {list(latents.shape)}")
        if self.global_tokens is not None:
            return torch.sigmoid(self.decoder(self.global_tokens.decode(latents)))
        grid = latents.transpose(1, 2).reshape(len(latents), self.latent_dim, self.grid_side, self.grid_side)
        return torch.sigmoid(self.decoder(grid.contiguous(memory_format=torch.channels_last)))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, S, S] in [0, 1] -> codes [N, K] int64 in [0, codebook_size), raster order.

        Raises:
            UserError: wrong pixel size, or a continuous tokenizer (it has no codes).
        """
        self._require_codes("encode")
        latents = self.encode_latents(pixels)
        return self.quantizer.codes_to_indices(latents.float()).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, K] int64 in [0, codebook_size) -> pixels [N, 3, S, S] in [0, 1].

        Raises:
            ValueError: codes of another shape or outside the codebook (a caller's bug).
        """
        self._require_codes("decode")
        if codes.dim() != 2 or codes.shape[1] != self.num_codes:
            raise ValueError(f"codes: expected [N, {self.num_codes}], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes: outside [0, {self.codebook_size}) ({int(codes.min())}..{int(codes.max())})")
        latents = self.quantizer.indices_to_codes(codes)  # [N, K, d], the levels' values
        return self.decode_latents(latents.to(next(self.decoder.parameters()).dtype))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels [N, 3, S, S] in [0, 1] -> (reconstruction [N, 3, S, S] in [0, 1], codes [N, K]
        int64, or None for kind continuous). The reconstruction keeps its gradient (through
        FSQ's straight-through rounding): what `objective: autoencoder` trains on."""
        latents = self.encode_latents(pixels)
        codes = None
        if self.quantizer is not None:
            with torch.no_grad():
                codes = self.quantizer.codes_to_indices(latents.detach().float()).long()
        return self.decode_latents(latents), codes

    def _require_codes(self, what: str) -> None:
        if self.quantizer is None:
            raise UserError(f"a continuous image tokenizer has no codes to {what} "
                            f"(encode_latents/decode_latents; kind fsq has codes)")
