"""`moe` fusion: each chosen layer's feed-forward gains routed experts under a top-k router,
beside the LLM's own MLP, with a load-balancing loss; optionally modality-aware (MoMa).

Design:
- The LLM's MLP stays as a *shared expert* that every token uses (DeepSeekMoE, Dai et al.
  2024, "DeepSeekMoE: Towards Ultimate Expert Specialization"; Qwen1.5-MoE's shared expert),
  and the layer's feed-forward output becomes `mlp(x) + sum_k w_k * expert_k(x)`.
- Routed experts are Llama-style gated MLPs (`down(act(gate(x)) * up(x))`) of `expert_size`
  (0: the LLM's intermediate size). Their down projections start at zero, so a freshly built
  model is the plain LLM exactly; the gate and up projections start random (nn.Linear's
  init), so that they get gradients once the down projections move.
- The router is a linear map D -> E; a token takes the k experts of highest probability
  (softmax over its group's logits) and weighs them by the softmax over those k logits
  (Mixtral, Jiang et al. 2024; HF `MixtralSparseMoeBlock`'s renormalised weights). With
  top_k 1 that weight would be the constant 1 and the router would learn from the balancing
  loss alone, so the one expert is weighed by its probability, as the Switch Transformer
  does (Fedus et al. 2022, eq. 2). Routing reads only the token itself and there is no
  capacity limit (nothing is dropped), so a batch routes each token as it would alone.
- `modality_aware: true` (MoMa, Lin et al. 2024, "MoMa: Efficient Early-Fusion Pre-training
  with Mixture of Modality-Aware Experts"): experts 0..image_experts-1 form the image group,
  the rest the text group; media tokens (`FusionCall.token_media_mask`, placeholders of any
  modality) choose their top-k in the image group only, text tokens in the text group only.
- Load balancing (Switch Transformer, Fedus et al. 2022, eq. 4): E * sum_i f_i * P_i, with
  f_i the share of the token -> expert assignments that went to expert i (sums to 1 over the
  experts, so a perfectly balanced router scores 1 whatever top_k) and P_i the mean router
  probability of expert i (softmax over all experts of the token's group). Modality-aware, the
  loss is computed in each group over its own tokens (E = the group's size) and averaged over
  the groups present. Each MoE layer appends aux_loss_weight * its loss / (number of MoE
  layers) to the call's `aux_losses` (a mean over layers, as HF's `load_balancing_loss_func`),
  only while the module trains with gradients on (inference pays nothing for it). In the
  training forward the padding cells of a batch are routed and counted like tokens.

Tokens stay inline as in LLaVA (`fills_placeholders`): the connector's K tokens replace the
image's K placeholders. Through one forward hook on each chosen layer's `mlp` (fusion.base):
every decoder loop (training, batch runner, server slots) calls it. No modeling file is forked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from polymodal.config import FusionConfig
from polymodal.errors import UserError
from polymodal.fusion.base import DecoderFusion, decoder_layers
from polymodal.registry import register_fusion


@dataclass
class MoEFusionConfig(FusionConfig):
    kind: str = "moe"
    experts: int = 4  # routed experts per layer (the LLM's MLP is the shared expert on top)
    top_k: int = 1  # experts each token uses (per group when modality_aware)
    expert_size: int = 0  # intermediate size of a routed expert; 0: the LLM's
    layers: list[int] | None = None  # None: every layer
    modality_aware: bool = False  # MoMa: image tokens to image experts, text tokens to text experts
    image_experts: int = 0  # size of the image group when modality_aware; 0: half the experts
    aux_loss_weight: float = 0.01  # scale of the load-balancing loss added to the training loss


def expert_groups(config: MoEFusionConfig) -> list[range]:
    """The expert groups a token may route within: [all] or, modality-aware, [image, text].

    Raises:
        UserError: a count out of range, naming the field (`model.fusion.top_k`, ...).
    """
    experts, top_k = config.experts, config.top_k
    if experts < 1:
        raise UserError(f"model.fusion.experts: {experts} must be at least 1")
    if top_k < 1:
        raise UserError(f"model.fusion.top_k: {top_k} must be at least 1")
    if config.expert_size < 0:
        raise UserError(f"model.fusion.expert_size: {config.expert_size} must be 0 (the LLM's) or more")
    if config.aux_loss_weight < 0:
        raise UserError(f"model.fusion.aux_loss_weight: {config.aux_loss_weight} must not be negative")
    if not config.modality_aware:
        if config.image_experts:
            raise UserError(f"model.fusion.image_experts: {config.image_experts} is read only with "
                            f"modality_aware: true")
        if top_k > experts:
            raise UserError(f"model.fusion.top_k: {top_k} is more than model.fusion.experts ({experts})")
        return [range(experts)]
    image = config.image_experts or experts // 2
    if not 1 <= image < experts:
        raise UserError(f"model.fusion.image_experts: {image} must leave at least one image and one text "
                        f"expert of model.fusion.experts ({experts})")
    if top_k > min(image, experts - image):
        raise UserError(f"model.fusion.top_k: {top_k} is more than a modality group's experts "
                        f"({image} image, {experts - image} text)")
    return [range(image), range(image, experts)]


class GatedMLP(nn.Module):
    """A routed expert, x [n, D] -> down(act(gate(x)) * up(x)) [n, D] (Llama's MLP shape);
    the down projection starts at zero, so a fresh expert outputs zeros."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        nn.init.zeros_(self.down_proj.weight)
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.Module):
    """One layer's router and routed experts.

    Children: `router` (Linear D -> E, no bias), `experts` (E `GatedMLP`s).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, groups: list[range],
                 top_k: int):
        super().__init__()
        self.groups, self.top_k = groups, top_k
        experts = groups[-1].stop
        self.router = nn.Linear(hidden_size, experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)  # transformers' initializer_range
        self.experts = nn.ModuleList(GatedMLP(hidden_size, intermediate_size, activation) for _ in range(experts))

    def group_of(self, media_mask: torch.Tensor) -> torch.Tensor:
        """media_mask [n] bool -> [n] each token's group (0 image, 1 text; all 0 when agnostic)."""
        if len(self.groups) == 1:
            return torch.zeros_like(media_mask, dtype=torch.long)
        return (~media_mask).long()

    def route(self, x: torch.Tensor, media_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, D], media_mask [n] -> (router logits [n, E], chosen experts [n, k], their weights
        [n, k]). A token chooses within its group only. Weights: top_k 1, the chosen expert's
        probability (Switch); top_k > 1, the softmax over the chosen logits (Mixtral)."""
        logits = self.router(x)  # [n, E]
        allowed = torch.zeros(len(self.groups), logits.shape[-1], dtype=torch.bool, device=x.device)
        for index, group in enumerate(self.groups):
            allowed[index, group.start:group.stop] = True
        probabilities = logits.masked_fill(~allowed[self.group_of(media_mask)], float("-inf")).softmax(dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)  # [n, k]
        if self.top_k > 1:  # Mixtral: renormalised over the chosen = the softmax of their logits
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, chosen, weights

    def forward(self, x: torch.Tensor, media_mask: torch.Tensor,
                with_loss: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [n, D], media_mask [n] -> (sum over the chosen experts of weight * expert(x) [n, D],
        the load-balancing loss [] or None when not with_loss)."""
        logits, chosen, weights = self.route(x, media_mask)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            # Every expert runs, on no tokens when none chose it: its weights stay in the
            # graph, so DDP sees a gradient (of zeros) for each of them every step.
            token, slot = (chosen == index).nonzero(as_tuple=True)
            out = out.index_add(0, token, (expert(x[token]) * weights[token, slot, None]).to(out.dtype))
        if not with_loss:
            return out, None
        return out, self.balance_loss(logits, chosen, media_mask)

    def balance_loss(self, logits: torch.Tensor, chosen: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        """The Switch Transformer's load-balancing loss [], the mean over the groups present of
        `load_balancing_loss` within the group over its own tokens."""
        group_of = self.group_of(media_mask)
        losses = []
        for index, group in enumerate(self.groups):
            tokens = group_of == index
            if bool(tokens.any()):
                losses.append(load_balancing_loss(logits[tokens][:, group.start:group.stop],
                                                  chosen[tokens] - group.start))
        return torch.stack(losses).mean()


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2022, eq. 4): logits [n, E], chosen
    experts [n, k] -> E * sum_i f_i * P_i [], f_i the share of the n * k assignments that went
    to expert i, P_i the mean over tokens of softmax(logits)_i. 1 when perfectly balanced."""
    experts = logits.shape[-1]
    probabilities = logits.float().softmax(dim=-1).mean(dim=0)  # [E]
    shares = F.one_hot(chosen, experts).float().mean(dim=(0, 1))  # [E]
    return experts * (shares * probabilities).sum()


@register_fusion("moe", config=MoEFusionConfig)
class MoEFusion(DecoderFusion):
    """Routed experts added to the feed-forward of the chosen layers; image tokens inline.

    Children: `layers[index]`, a `RoutedExperts` keyed by the decoder layer's index.

    Raises:
        UserError: counts out of range (`expert_groups`), or a layer index the LLM lacks.
    """

    fills_placeholders = True
    uses_media_tokens = False

    def __init__(self, config: MoEFusionConfig | None = None):
        super().__init__()
        self.config = config or MoEFusionConfig()
        self.groups = expert_groups(self.config)
        self.layers = nn.ModuleDict()

    def attach(self, llm_model: nn.Module) -> None:
        layers, llm_config = decoder_layers(llm_model), llm_model.config
        chosen = self.config.layers if self.config.layers is not None else range(len(layers))
        for index in chosen:
            if not -len(layers) <= index < len(layers):
                raise UserError(f"model.fusion.layers: {index} is not a layer of the LLM's {len(layers)}")
        for index in sorted({index % len(layers) for index in chosen}):
            routed = RoutedExperts(llm_config.hidden_size, self.config.expert_size or llm_config.intermediate_size,
                                   getattr(llm_config, "hidden_act", "silu"), self.groups, self.config.top_k)
            self.layers[str(index)] = routed
            self.hook_output(layers[index].mlp, self._add_routed(routed))

    def _add_routed(self, routed: RoutedExperts):
        """The hook body on a layer's `mlp`: output [.., D] + the routed experts' output of its
        input (the post-attention-norm hidden states [B, T, D] or [N, D])."""
        def apply(fusion_call, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            with_loss = self.training and torch.is_grad_enabled() and self.config.aux_loss_weight > 0
            flat = inputs.reshape(-1, inputs.shape[-1]).to(routed.router.weight.dtype)  # [N, D]
            added, loss = routed(flat, fusion_call.token_media_mask.to(flat.device), with_loss)
            if loss is not None:
                fusion_call.aux_losses.append(loss * (self.config.aux_loss_weight / len(self.layers)))
            return output + added.view_as(output).to(output.dtype)
        return apply
