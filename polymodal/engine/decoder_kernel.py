"""The decoding step in one C call (`polymodal.kernels.decoder_step`) for the models it covers:
Llama-family layers whose seven projections are all polymodal's int8 kernels, all its int4
kernels (one group size), or all plain float32 `nn.Linear`; RMSNorm; a SiLU-gated MLP; no
hooks on those modules. `LlamaDecoder.run` calls it for one new token per row outside a
fusion call (LoRA adapters merged into their layers, as the engine merges them while
generating, count as those layers; one adapter kept beside its layer, int4's default, runs in
the call too); everything else (prefill, a fusion inside the decoder, gradients,
`POLYMODAL_KERNELS=off`) runs the eager step (`engine.decoder`).

A decoder builds its step (~2 ms for SmolLM2's 30 layers) at its first decoding step after
each prefill (a generation, a server slot's admission; `LlamaDecoder.forget_step`), from the
model's modules as they are then, so weights loaded or layers swapped between generations
are always read; within a generation the step is reused unchecked, and since it holds
aliases of every operand, a weight swapped mid-generation is read stale, never from freed
memory. Nothing is cached beyond the decoder, so no step keeps a model's old weights alive.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from polymodal.engine.kv_cache import KVCache
from polymodal.kernels import quantized_matmul
from polymodal.kernels.decoder_step import DecoderStep, LayerWeights
from polymodal.quantization import Int4Linear, Int8Linear

_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LM head -> (its weight, float32 plan)
_ENABLED = [True]
UNCHECKED = object()  # a decoder whose step has not been looked up since its last prefill
ACTIVATIONS = ("silu", "swish")


@contextmanager
def eager_steps():
    """Run the eager step inside this block (benchmarks compare the two in one process)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def layer_modules(layer: nn.Module) -> tuple[nn.Module | None, ...]:
    """(input norm, post-attention norm, q, k, v, o, gate, up, down) of a Llama decoder layer,
    None where the layer lacks one (a fusion's experts in place of the MLP)."""
    children = layer._modules
    attention, mlp = children.get("self_attn"), children.get("mlp")
    attention = {} if attention is None else attention._modules
    mlp = {} if mlp is None else mlp._modules
    return (children.get("input_layernorm"), children.get("post_attention_layernorm"),
            *(attention.get(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(mlp.get(name) for name in ("gate_proj", "up_proj", "down_proj")))


def steps_enabled() -> bool:
    """Whether the one-call step may run now: not inside `eager_steps`, no gradients recorded,
    no CPU autocast (under which the eager step would compute in bfloat16)."""
    return _ENABLED[-1] and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def decoder_step(decoder) -> DecoderStep | None:
    """A C step of this `LlamaDecoder`'s model as it is now, or None where it does not cover
    the model."""
    if not steps_enabled() or not quantized_matmul.available():
        return None
    modules = tuple(module for layer in decoder.layers for module in layer_modules(layer))
    containers = tuple(module for layer in decoder.layers
                       for module in (layer, layer._modules.get("self_attn"), layer._modules.get("mlp")))
    if any(module is None for module in modules):
        return None
    computing = [_computing(module) for module in modules]
    adapter_parts = tuple(part for *_, parts in computing for part in parts)
    if _hooked(modules + containers + tuple(base for base, _, _ in computing) + adapter_parts):
        return None
    return _build(decoder, tuple(base for base, _, _ in computing), [lora for _, lora, _ in computing])


def head_plan(decoder) -> quantized_matmul.Plan | None:
    """A float32 plan of the decoder's LM head (a plain bias-free float32 `nn.Linear`, no hooks;
    ~1.15x torch's F.linear at batch 1), else None. Checked at every call: one module."""
    head = decoder.lm_head
    if (type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.float32
            or _hooked((head,)) or not steps_enabled()):
        return None
    cached = _HEADS.get(head)
    if cached is not None and cached[0] is head.weight and cached[1].valid():
        return cached[1]
    try:
        plan = quantized_matmul.Plan("float32", [(head.weight,)])
    except ValueError:  # kernels unavailable, K not a multiple of 64, not on the CPU
        return None
    _HEADS[head] = (head.weight, plan)
    return plan


def run_step(step: DecoderStep, hidden: torch.Tensor, cache: KVCache, layout) -> torch.Tensor:
    """hidden [N, D], one new token per row of `layout` (a TokenLayout of grid [N, 1] with no
    padding) -> the last layer's output [N, D]; keys and values go into `cache`."""
    return step(hidden, cache.keys, cache.values, cache.key_mask, layout.token_rows.contiguous(),
                layout.token_slots.contiguous(), layout.span, layout.cos[:, 0].contiguous(),
                layout.sin[:, 0].contiguous())


def _build(decoder, modules: tuple[nn.Module, ...], adapters: list[tuple | None]) -> DecoderStep | None:
    config = decoder.body.config
    if getattr(config, "hidden_act", None) not in ACTIVATIONS:
        return None
    kind, group = _kind(modules)
    if kind is None:
        return None
    layers, eps = [], set()
    for start in range(0, len(modules), 9):
        norms, projections = modules[start:start + 2], modules[start + 2:start + 9]
        if not all(isinstance(getattr(norm, "weight", None), torch.Tensor) and hasattr(norm, "variance_epsilon")
                   for norm in norms):
            return None
        eps.update(norm.variance_epsilon for norm in norms)
        layers.append(LayerWeights(norms[0].weight, norms[1].weight,
                                   tuple((*_operands(module), lora) for module, lora
                                         in zip(projections, adapters[start + 2:start + 9]))))
    if len(eps) != 1:
        return None
    try:
        return DecoderStep(kind, layers, decoder.heads, decoder.kv_heads, decoder.head_dim, eps.pop(), group)
    except ValueError:  # a shape or dtype the C step does not take: the eager step serves
        return None


def _computing(module: nn.Module) -> tuple[nn.Module, tuple | None, tuple[nn.Module, ...]]:
    """(the layer that computes `module`'s product, its LoRA adapter kept beside it or None,
    the adapter's modules) as peft's `Linear.forward` computes it: merged adapters (the engine
    merges them while generating, `llm.merged_lora`) leave the base layer alone; one active
    unmerged adapter (int4 keeps them so) adds scale * B(A x). Anything else peft does (DoRA,
    several adapters, dropout while training, adapter bias) is returned as the wrapper itself,
    which no kind covers, so such a model runs the eager step."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return module, None, ()
    if not isinstance(module, LoraLayer) or module.disable_adapters:
        return module, None, ()
    base = module.get_base_layer()
    if module.merged:
        return base, None, ()
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return module, None, ()
    name = adapters[0]
    down, up, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if (module.use_dora.get(name) or getattr(module, "lora_bias", {}).get(name)
            or (dropout.training and not isinstance(dropout, nn.Identity))):
        return module, None, ()
    return base, (down.weight, up.weight, module.scaling[name]), (down, up, dropout)


def _kind(modules: tuple[nn.Module, ...]) -> tuple[str | None, int]:
    """("int8" | "int4" | "float32", int4 group size) when every projection is of that one kind
    on polymodal's kernels (float32: plain nn.Linear on the CPU), else (None, 0)."""
    projections = [module for index, module in enumerate(modules) if index % 9 >= 2]
    kinds = {type(module) for module in projections}
    if kinds == {Int8Linear} and all(module.own_kernel for module in projections):
        return "int8", 0
    if kinds == {Int4Linear} and all(module.own_kernel for module in projections):
        groups = {module.group_size for module in projections}
        return ("int4", groups.pop()) if len(groups) == 1 else (None, 0)
    if kinds == {nn.Linear} and all(module.weight.dtype == torch.float32 for module in projections):
        return "float32", 0
    return None, 0


def _operands(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """(weight, scales, mins, bias) as `LayerWeights` documents."""
    if isinstance(module, (Int8Linear, Int4Linear)):
        operands = module.kernel_operands()
        return (*operands, *(None,) * (3 - len(operands)), module.bias)
    return module.weight, None, None, module.bias


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether any module has forward hooks, which only the eager step would call."""
    return any(module is not None and (module._forward_hooks or module._forward_pre_hooks) for module in modules)
