"""The decoding step in one C call (`polymodal.kernels.decoder_step`) for the models it covers:
Llama-family layers whose seven projections are all polymodal's int8 kernels, all its int4
kernels (one group size), or all plain float32 `nn.Linear`; RMSNorm; a SiLU-gated MLP; no
hooks on those modules. `LlamaDecoder.run` calls it for one new token per row outside a
fusion call; everything else (prefill, LoRA kept beside the layers, a fusion inside the
decoder, gradients, `POLYMODAL_KERNELS=off`) runs the eager step (`engine.decoder`).

The step is built once per model and kept beside it (a weak map). A decoder looks it up at
its first decoding step after each prefill (a generation, a server slot's admission), checked
against the model's current modules and tensors, so loading weights or swapping a layer
rebuilds it; within a generation it is reused unchecked, and since it holds aliases of every
operand, a weight swapped mid-generation is read stale, never from freed memory.
"""

from __future__ import annotations

import operator
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from polymodal.engine.kv_cache import KVCache
from polymodal.kernels import quantized_matmul
from polymodal.kernels.decoder_step import DecoderStep, LayerWeights
from polymodal.quantization import Int4Linear, Int8Linear

# decoder body (the transformers model under the LM head) -> (its modules, their operand versions, the
# tensors the step reads, step or None)
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
    None where the layer lacks one (a fusion's experts in place of the MLP). Read from the
    modules' own tables: this runs every step, and nn.Module's attribute lookup costs ~1 us."""
    children = layer._modules
    attention, mlp = children.get("self_attn"), children.get("mlp")
    attention = {} if attention is None else attention._modules
    mlp = {} if mlp is None else mlp._modules
    return (children.get("input_layernorm"), children.get("post_attention_layernorm"),
            *(attention.get(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(mlp.get(name) for name in ("gate_proj", "up_proj", "down_proj")))


def steps_enabled() -> bool:
    """Whether the one-call step may run now: not inside `eager_steps`, no gradients recorded."""
    return _ENABLED[-1] and not torch.is_grad_enabled()


def decoder_step(decoder) -> DecoderStep | None:
    """The C step of this `LlamaDecoder`'s model, or None where it does not cover the model
    (~0.2 ms: every module and tensor checked against the cached step)."""
    if not steps_enabled() or not quantized_matmul.available():
        return None
    modules = tuple(module for layer in decoder.layers for module in layer_modules(layer))
    if _hooked(modules):
        return None
    versions = tuple(module.__dict__.get("operand_version") for module in modules if module is not None)
    tensors = _tensors(modules)
    cached = _STEPS.get(decoder.body)
    if (cached is not None and cached[0] == modules and cached[1] == versions
            and len(cached[2]) == len(tensors) and all(map(operator.is_, cached[2], tensors))):  # the very tensor objects (`is`: == compares values)
        if cached[3] is None or cached[3].valid():  # and each still at its address (a `.data =` moves it)
            return cached[3]
    step = _build(decoder, modules)
    _STEPS[decoder.body] = (modules, versions, tensors, step)
    return step


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


def _build(decoder, modules: tuple[nn.Module, ...]) -> DecoderStep | None:
    config = decoder.body.config
    if any(module is None for module in modules) or getattr(config, "hidden_act", None) not in ACTIVATIONS:
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
        layers.append(LayerWeights(norms[0].weight, norms[1].weight, tuple(_operands(module) for module in projections)))
    if len(eps) != 1:
        return None
    try:
        return DecoderStep(kind, layers, decoder.heads, decoder.kv_heads, decoder.head_dim, eps.pop(), group)
    except ValueError:  # a shape or dtype the C step does not take: the eager step serves
        return None


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
    """(weight, scales, mins, bias) as `LayerWeights` documents: the module's own tensors (not
    detached copies), so that the step's address checks follow a `.data =` on them."""
    if isinstance(module, (Int8Linear, Int4Linear)):
        operands = module.kernel_operands()
        return (*operands, *(None,) * (3 - len(operands)), module.bias)
    return module.weight, None, None, module.bias


def _tensors(modules: tuple[nn.Module | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """Every parameter and buffer of `modules`, read from their tables (this runs every step)."""
    return tuple(tensor for module in modules if module is not None
                 for table in (module._parameters, module._buffers) for tensor in table.values())


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether any module has forward hooks, which only the eager step would call."""
    return any(module is not None and (module._forward_hooks or module._forward_pre_hooks) for module in modules)
