"""A continuous image head: MAR's per-token flow-matching head on the LLM's hidden states.

MAR (Li et al., 2024, "Autoregressive Image Generation without Vector Quantization";
github.com/LTH14/mar, models/diffloss.py) drops the image tokenizer's quantiser: the LLM
predicts each latent of the image's grid as a vector of floats. A small MLP (`FlowHead`,
MAR's SimpleMLPAdaLN: residual MLP blocks whose LayerNorms are modulated by the condition)
models the distribution of the next latent given the LLM's hidden state. MAR trains it with
a diffusion loss; here with flow matching (rectified flow; Lipman et al., 2023, Liu et al.,
2023): x_t = (1 - t) x0 + t x1 from noise x0 to the latent x1, the head predicts the velocity
x1 - x0, and sampling integrates it with Euler steps from t = 0 to 1. As in MAR the loss
draws several noises and times per latent (`noise_draws`, their `diffusion_batch_mul`):
the head is cheap beside the LLM that computed the condition.

The LLM reads an image as [<begin_of_image>, K latent positions, <end_of_image>] with the
ids `ImageCodes` lays out for a codebook of none: `<begin_of_image>` = V, `<end_of_image>` =
V + 1 (their embedding and head rows are `CodeEmbedding`/`CodeHead`'s, as for kind tokens),
and V + 2 marks a latent position (never embedded by the LLM nor scored): its input is the
linear projection of the latent it holds (`ImageFlow.latent_embeddings`), and its hidden
state conditions the head's prediction of the next latent (the begin marker's predicts
latent 0). Classifier-free guidance mixes velocities: v = v_u + s (v_c - v_u), v_u
conditioned on the hidden state of the unconditional twin row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import FlowHeadConfig
from polymodal.image_generation.codes import ImageCodes

DRAWN_LATENTS = "drawn_latents"  # Batch.media's entry of the drawn images' latents [N, K, d]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [N] in [0, 1] -> sinusoidal features [N, dim] (DiT's / MAR's, of t scaled to 0..1000,
    the range their diffusion steps span, so the frequencies resolve small steps of t)."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(-math.log(max_period) * steps / half)  # [half]
    angles = 1000.0 * t.float()[:, None] * frequencies[None]  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(LayerNorm(x) * (1 + scale) + shift), (shift, scale, gate) from the
    condition y: x [N, W], y [N, W] -> [N, W] (MAR's ResBlock). Starts as the identity
    (the modulation is zero-initialised, so the gate is 0)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """The velocity of a latent's flow, given the LLM's hidden state (MAR's SimpleMLPAdaLN).

    velocity(x_t [N, d], t [N] in [0, 1], condition [N, D]) -> [N, d]. The condition and
    the time are embedded to the width W and summed into y, which modulates each block's
    LayerNorm (adaptive LayerNorm, DiT); the output layer starts at zero (MAR's init).

    Args:
        hidden_size: D, the LLM's hidden size; latent_dim: d, floats per latent;
        width: W; depth: residual blocks.
    """

    def __init__(self, hidden_size: int, latent_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        self.input_projection = nn.Linear(latent_dim, width)
        self.time_embedding = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.condition_embedding = nn.Linear(hidden_size, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, latent_dim)
        for layer in (self.final_modulation[1], self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x_t [N, d], t [N] in [0, 1], condition [N, D] -> velocity [N, d] (the head's dtype)."""
        dtype = self.output.weight.dtype
        time = self.time_embedding(timestep_embedding(t, 256).to(dtype))
        y = time + self.condition_embedding(condition.to(dtype))  # [N, W]
        x = self.input_projection(x_t.to(dtype))
        for block in self.blocks:
            x = block(x, y)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.output(self.final_norm(x) * (1 + scale) + shift)

    def loss(self, latents: torch.Tensor, condition: torch.Tensor, draws: int = 4) -> torch.Tensor:
        """The flow-matching loss: latents [N, d] (x1), condition [N, D] -> the mean squared
        error of the predicted velocity against x1 - x0, over `draws` noises x0 ~ N(0, I) and
        times t ~ U(0, 1) per latent (MAR's diffusion_batch_mul). Noise from the global RNG."""
        dtype = self.output.weight.dtype
        target = latents.to(dtype).repeat(draws, 1)  # [draws * N, d]
        noise = torch.randn_like(target)
        t = torch.rand(len(target), device=target.device, dtype=dtype)
        x_t = (1 - t[:, None]) * noise + t[:, None] * target
        predicted = self.velocity(x_t, t, condition.repeat(draws, 1))
        return F.mse_loss(predicted.float(), (target - noise).float())

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, steps: int = 25,
               generator: torch.Generator | list[torch.Generator | None] | None = None,
               temperature: float = 1.0, guidance: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """Latents [N, d] for conditions [N, D]: Euler steps of the velocity from t = 0 to 1.

        Args:
            generator: the noise's RNG, one for all rows or a list with one per row (so a
                row draws the same whatever else is in the batch); None: the global RNG.
            temperature: the start noise's scale (0: no noise, one deterministic latent per
                condition; below 1: closer to the mode, as MAR's temperature).
            guidance: (unconditional conditions [N, D], scale s): classifier-free guidance,
                v = v_u + s (v_c - v_u); at s = 1 the conditional velocity alone.
        """
        dtype = self.output.weight.dtype
        x = start_noise(len(condition), self.latent_dim, generator, condition.device).to(dtype) * temperature
        guided = guidance is not None and guidance[1] != 1.0
        conditions = torch.cat([condition, guidance[0]]) if guided else condition
        for step in range(steps):
            t = x.new_full((len(conditions),), step / steps)
            velocity = self.velocity(torch.cat([x, x]) if guided else x, t, conditions)
            if guided:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance[1] * (conditional - unconditional)
            x = x + velocity / steps
        return x


def start_noise(rows: int, dim: int, generator, device) -> torch.Tensor:
    """Noise [rows, dim] ~ N(0, I): from one generator, or row by row from a list of them."""
    if not isinstance(generator, list):
        return torch.randn(rows, dim, generator=generator, device=device)
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} generators for {rows} rows")
    return torch.stack([torch.randn(dim, generator=row, device=device) for row in generator])


class ImageFlow(nn.Module):
    """Image output kind `flow`: the head, the latents' input projection, and where the image
    block's ids sit (`layout`: ImageCodes of codebook 0; `latent_id` = V + 2 marks a latent).

    Part `image_output` with the markers' rows. The engine reads `layout`, `sampling_steps`,
    `head.sample` and `latent_embeddings` (it never imports this module).
    """

    def __init__(self, layout: ImageCodes, hidden_size: int, latent_dim: int, config: FlowHeadConfig):
        super().__init__()
        self.layout, self.config = layout, config
        self.sampling_steps = config.sampling_steps
        self.head = FlowHead(hidden_size, latent_dim, config.width, config.depth)
        self.projection = nn.Linear(latent_dim, hidden_size)  # a latent -> the LLM's input [D]

    @property
    def latent_id(self) -> int:
        return self.layout.first_code_id

    def block(self) -> list[int]:
        """One image's ids: [begin, K latent ids, end]."""
        return [self.layout.begin_id, *[self.latent_id] * self.layout.num_codes, self.layout.end_id]

    def latent_embeddings(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [..., d] -> the LLM's input embeddings [..., D] of the positions holding them."""
        return self.projection(latents.to(self.projection.weight.dtype))

    def embed(self, embed_tokens, input_ids: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings [B, T, D] of ids [B, T] whose latent positions hold `latents`
        [N, K, d] (the drawn images in reading order): `embed_tokens` embeds the other ids.

        Raises:
            RuntimeError: latent positions and latents differ in number (a caller's bug).
        """
        positions = input_ids == self.latent_id  # [B, T]
        embeds = embed_tokens(input_ids.masked_fill(positions, self.layout.begin_id))
        count = int(positions.sum())
        given = 0 if latents is None else latents.shape[0] * latents.shape[1]
        if count != given:
            raise RuntimeError(f"{count} latent positions in the ids, {given} latents given")
        if not count:
            return embeds
        rows = self.latent_embeddings(latents.reshape(count, -1)).to(embeds.dtype)  # [count, D]
        return embeds.masked_scatter(positions.unsqueeze(-1).expand_as(embeds), rows)

    def loss(self, latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The weighted flow loss of latents [N, d] given the hidden states [N, D] that predict them."""
        return self.config.loss_weight * self.head.loss(latents, condition, self.config.noise_draws)
