"""What a fusion kind that works inside the decoder's layers shares: attaching forward hooks
to the calls every decoder loop makes, a block before a layer, and its per-row state.

A kind is an `nn.Module` whose own weights are its children (saved under `fusion.*`, so the
LLM's keys, LoRA targets and checkpoints stay as they are). `attach(llm)` runs once, after
LoRA is injected: it registers forward hooks on `self_attn.q_proj`, `k_proj`, `v_proj`,
`o_proj` and `mlp` of the layers it uses (design.md, "Fusion inside the decoder"). The
batch runner and the server's slots call those modules themselves, so the hooks run there as
in transformers' forward; a block that runs *before* a layer (Flamingo) is the one step the
runners call explicitly (`before_layer`), and a pre-hook on the layer runs it in
transformers' own loop.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.fusion.context import FusionState, current
from polymodal.fusion.inline import scatter_media


def decoder_layers(llm_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (peft-wrapped or not)."""
    return llm_model.get_decoder().layers


class DecoderFusion(nn.Module):
    """Base of the kinds that change what happens inside decoder layers.

    Subclasses set `tokens_per_medium` (None: the connector's K, tokens inline as LLaVA;
    1: one placeholder per image, its tokens read inside the layers), implement `attach`,
    and may override `before_layer` and `prepare` (per-request tensors into the state).
    """

    fills_placeholders = False  # the connector's tokens replace the placeholders' embeddings
    uses_media_tokens = True  # the state keeps each row's media tokens [R, M, K, D]

    def __init__(self):
        super().__init__()
        self._hooks: list = []

    def forward(self, text_embeds: torch.Tensor, placeholder_mask: torch.Tensor,
                media_tokens: torch.Tensor | None, modality: str = "image") -> torch.Tensor:
        """text_embeds [B, T, D] -> [B, T, D]: the media tokens fill their placeholders when
        the kind keeps them inline (`fills_placeholders`); else the text is left as it is
        (they reach the layers through the state)."""
        if self.fills_placeholders:
            return scatter_media(text_embeds, placeholder_mask, media_tokens, modality)
        return text_embeds

    def text_tokens_per_medium(self, connector_tokens: int) -> int:
        """How many placeholder tokens an image takes in the text."""
        return connector_tokens

    def attach(self, llm_model: nn.Module) -> None:
        """Register this kind's hooks on the LLM (after LoRA). Subclasses extend."""

    def before_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] or [N, D] entering layer `index` -> the same shape."""
        return hidden

    def new_state(self, media: torch.Tensor | None, media_count: torch.Tensor, placeholder_ids: list[int],
                  image_id: int, tokens_per_medium: int) -> FusionState:
        """The state of a batch of rows: media [R, M, K, D] (None: text only), media_count [R]."""
        state = FusionState(media if self.uses_media_tokens else None, media_count, placeholder_ids,
                            image_id, tokens_per_medium)
        state.fusion = self
        return state

    # ------------------------------------------------------------ hook helpers

    def hook_output(self, module: nn.Module, function) -> None:
        """Call function(call, inputs, output) -> new output after `module` runs inside a fusion
        call (no call running: the output is kept, the plain LLM's)."""
        def hook(module, args, output):
            fusion_call = current()
            return output if fusion_call is None else function(fusion_call, args[0], output)
        self._hooks.append(module.register_forward_hook(hook))

    def hook_input(self, module: nn.Module, function) -> None:
        """Call function(call, input) -> new input before `module` runs inside a fusion call."""
        def hook(module, args):
            fusion_call = current()
            return None if fusion_call is None else (function(fusion_call, args[0]), *args[1:])
        self._hooks.append(module.register_forward_pre_hook(hook))

    def hook_layer_input(self, layer: nn.Module, index: int) -> None:
        """Run `before_layer(index, ...)` on a transformers decoder layer's hidden states (its
        first argument) when transformers' own loop calls the layer."""
        def hook(module, args, kwargs):
            if current() is None:
                return None
            if args:
                return (self.before_layer(index, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.before_layer(index, kwargs["hidden_states"])}
        self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))


def replace_at(mask: torch.Tensor, output: torch.Tensor, function, inputs: torch.Tensor) -> torch.Tensor:
    """output [..., X] with the rows where mask [N] (over the flattened leading axes) is True
    replaced by function(inputs rows [n, Y]) -> [n, X]; autograd flows through both."""
    flat = output.reshape(-1, output.shape[-1])
    if not bool(mask.any()):
        return output
    where = mask.nonzero().squeeze(-1)
    replaced = flat.index_copy(0, where, function(inputs.reshape(-1, inputs.shape[-1])[where]).to(flat.dtype))
    return replaced.view_as(output)
