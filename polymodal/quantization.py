"""Weight-only quantization of a decoder LLM's linear layers: int8 per output channel, int4
in groups, run by polymodal's kernels where the CPU has AVX-512 VNNI or AVX2, else by the
kernels torch ships for the CPU.

`Int8Linear` and `Int4Linear` replace `nn.Linear` in place (`quantize_language_model`), so
every loop that calls the model's modules (transformers' forward, the engine's decoder step,
the server's slots) runs them unchanged. Activations stay float; only the weights, which a
batch-1 decode streams from memory once per token, shrink 4x (int8) or ~7x (int4).

- int8: w ≈ q * s, q in [-127, 127], s = max|w_row| / 127 per output row (symmetric, from
  the weights). Kernel: `torch.ops.aten._weight_int8pack_mm(x, q, s)` (x @ (q * s)^T).
- int4: per row and group of `group_size` inputs, w ≈ q * s + min with q in [0, 15],
  s = (max - min) / 15 (asymmetric), s and min stored in float16 (llama.cpp's Q4_1 with
  groups of 32: a model dequantized from a Q4_1 GGUF, as SmolLM2 here, requantizes to the
  very same codes, scales and mins, so its int4 weights are the file's own, lossless; a file
  quantized by llama.cpp's reference path, not with an importance matrix, whose min and
  scale come from a search). torch's
  kernel (`_weight_int4pack_mm_for_cpu`, the "tinygemm" layout from gpt-fast) reads
  (q - 8) * s + z with z = min + 8 s in bfloat16: a table [K / group, N, 2] of (s, z) built
  from those when it runs (so on torch's kernel the grid is rounded twice: once to float16,
  once to bfloat16).

Kernels. On a CPU with AVX-512 VNNI or AVX2, `polymodal.kernels.quantized_matmul` (compiled on
first use for the wider of the two) quantizes the activations to int8 in blocks of 32 (llama.cpp's Q8_0) and takes integer
dot products: at batch 1 its products run 1.5-2x faster than torch's kernels
(benchmarks/RESULTS.md). Elsewhere, or with `POLYMODAL_KERNELS=off`, torch's kernels run:
on x86 they are vectorized (AVX-512 or AVX2) for bfloat16 activations only (float32 ones
fall to a scalar loop ~10x slower), so activations enter them in bfloat16 (torch's own
choice in gpt-fast/torchao), accumulate in float32, and come back in the caller's dtype.
int8's scales are stored in bfloat16, int4's scales and mins in float16.

The int4 kernel's packed layout depends on the CPU's vector width (64 rows per block with
AVX-512, 32 with AVX2), so what is saved is the portable form (two codes per byte, low
nibble first, [N, K/2]) and the kernel's layout is rebuilt whenever weights are loaded.

Example:
    quantize_language_model(causal_lm, QuantizationConfig(bits="int4", group_size=32))
    logits = causal_lm(input_ids).logits  # same call, int4 matmuls inside
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import torch
from torch import nn

from polymodal.config import QuantizationConfig
from polymodal.errors import UserError
from polymodal.kernels import quantized_matmul

COMPUTE_DTYPE = torch.bfloat16  # what the x86 kernels vectorize (see the module docstring)

# The decoder's linear layers that quantize (Llama family names; Qwen2 and others share them).
LAYER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Each change of a layer's kernel operands gets a number never used before, so a kernel plan
# (pointers into those operands) made for older ones is never reused.
_OPERAND_VERSIONS = itertools.count(1)
# first layer of a group -> {group size: (operand versions, plan)}. Kept outside the layers so
# that `copy.deepcopy` or pickling a model never carries pointers into the original's tensors.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights, one float scale per output channel.

    Buffers: weight int8 [N, K], scales bfloat16 [N], bias [N] or None (saved); the scales
    in float32 for polymodal's kernel (not saved).
    forward: x [..., K] float -> [..., N] in x's dtype: polymodal's kernel (activations
    quantized per block of 32) where `own_kernel`, else torch's (bfloat16 activations).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("kernel_scales", None, persistent=False)
        self.use_kernel(True)  # where this CPU and shape allow

    def use_kernel(self, own: bool) -> None:
        """Run polymodal's kernel (`own`, where it supports this layer) or torch's."""
        self.own_kernel = own and self.weight.is_cpu and quantized_matmul.supports(self.in_features)
        self.kernel_scales = self.scales.float() if self.own_kernel else None
        self.operand_version = next(_OPERAND_VERSIONS)
        _PLANS.pop(self, None)  # a plan of the old operands would keep them alive

    def kernel_operands(self) -> tuple[torch.Tensor, ...]:
        """What polymodal's kernel reads: (weight int8 [N, K], scales float32 [N])."""
        return self.weight, self.kernel_scales

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.weight.clamp_(-127, 127)  # -128 has no int8 negation, which the kernel needs
        self.use_kernel(self.own_kernel)  # scales were copied in place: the float copy follows

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.use_kernel(self.own_kernel)  # buffers may be new tensors (`.to`, `.share_memory`)
        return result

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a float weight [N, K] (and keep its bias [N])."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None)
        codes, scales = quantize_int8(weight)
        layer.weight.copy_(codes)
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        layer.use_kernel(layer.own_kernel)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:
            return project(x, (self,))[0]
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight [N, K] this layer computes with."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=int8"


class Int4Linear(nn.Module):
    """`nn.Linear` with 4-bit weights, a scale and a minimum per group of `group_size` inputs.

    Buffers: codes uint8 [N, K/2] (portable: two 4-bit codes per byte, low nibble first;
    saved), scales_and_mins float16 [N, K/group, 2] (w = code * scale + min; saved), bias [N]
    or None (saved), and the running kernel's own layout, rebuilt from those (not saved):
    `packed` uint8 and `torch_table` bfloat16 [K/group, N, 2] of (scale, min + 8 scale) for
    torch's; or `packed` uint8 [N, K/2] (`quantized_matmul.int4_layout`) with `kernel_scales`
    and `kernel_mins` float16 [N, K/group] for polymodal's. A model saved before float16
    (scales_and_zeros bfloat16 [K/group, N, 2] of (s, z)) loads, converted.
    forward: x [..., K] float -> [..., N] in x's dtype (as Int8Linear's).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("codes", torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8))
        self.register_buffer("scales_and_mins", torch.zeros(out_features, in_features // group_size, 2,
                                                            dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("torch_table", None, persistent=False)
        self.register_buffer("kernel_scales", None, persistent=False)
        self.register_buffer("kernel_mins", None, persistent=False)
        self.use_kernel(True)  # where this CPU, shape and group size allow

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
        """Quantize a float weight [N, K] in groups of `group_size` inputs (and keep its bias)."""
        layer = cls(weight.shape[1], weight.shape[0], group_size, bias is not None)
        codes, scales_and_mins = quantize_int4(weight, group_size)
        layer.codes.copy_(pack_nibbles(codes))
        layer.scales_and_mins.copy_(scales_and_mins)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        layer.repack()
        return layer

    def use_kernel(self, own: bool) -> None:
        """Run polymodal's kernel (`own`, where it supports this layer) or torch's."""
        self.own_kernel = (own and self.codes.is_cpu and quantized_matmul.supports(self.in_features)
                           and self.group_size in (32, 64))
        self.repack()

    def repack(self) -> None:
        """The running kernel's layout of `codes` (torch's depends on the CPU's vector width)."""
        codes = unpack_nibbles(self.codes)  # [N, K] in 0..15
        scales, mins = self.scales_and_mins.unbind(-1)  # float16 [N, K/group] each
        if not self.own_kernel:
            table = torch.stack([scales.float(), mins.float() + 8 * scales.float()], dim=-1)  # q s + min = (q - 8) s + z
            operands = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
                        table.permute(1, 0, 2).to(COMPUTE_DTYPE).contiguous(), None, None)
        else:
            operands = quantized_matmul.int4_layout(codes), None, scales.contiguous(), mins.contiguous()
        # all in place before the new version, so a concurrent caller never pairs them wrongly
        self.packed, self.torch_table, self.kernel_scales, self.kernel_mins = operands
        self.operand_version = next(_OPERAND_VERSIONS)
        _PLANS.pop(self, None)

    def kernel_operands(self) -> tuple[torch.Tensor, ...]:
        """What polymodal's kernel reads: (packed uint8 [N, K/2], scales and mins float16 [N, K/group])."""
        return self.packed, self.kernel_scales, self.kernel_mins

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old_key, key = prefix + "scales_and_zeros", prefix + "scales_and_mins"
        if old_key in state_dict and key not in state_dict:  # saved before float16: (s, z) bfloat16 [K/g, N, 2]
            scales, zeros = state_dict.pop(old_key).float().permute(1, 0, 2).unbind(-1)
            state_dict[key] = torch.stack([scales, zeros - 8 * scales], dim=-1).half()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_float16()  # an `assign=True` load takes the saved tensor as it is
        self.repack()  # codes were copied in place: the kernel's copy follows them

    def _apply(self, fn, recurse=True):
        grid = self.scales_and_mins
        result = super()._apply(fn, recurse)
        if self.scales_and_mins.dtype != torch.float16:  # `.float()`, `.to(dtype)` cast every float buffer:
            self.scales_and_mins = grid.to(self.scales_and_mins.device)  # keep the grid itself (see below)
        self.repack()  # buffers may be new tensors (`.to`, `.share_memory`)
        return result

    def _keep_float16(self) -> None:
        """scales_and_mins stays float16 whatever the module is cast to or loaded from: it is
        the saved grid (Q4_1's), which the codes were rounded against, and what polymodal's
        kernel reads."""
        if self.scales_and_mins.dtype != torch.float16:
            self.scales_and_mins = self.scales_and_mins.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:
            return project(x, (self,))[0]
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                         self.torch_table).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (polymodal's kernel: q * s + min per
        group; torch's rounds s and min + 8 s to bfloat16 first)."""
        codes = unpack_nibbles(self.codes).float().view(self.out_features, -1, self.group_size)
        scales, mins = self.scales_and_mins.float().unbind(-1)
        return (codes * scales[..., None] + mins[..., None]).view(self.out_features, -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=int4, "
                f"group_size={self.group_size}")


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """x [..., K] through linear layers that share it (a layer's q, k and v; gate and up) ->
    [x @ W_j^T + b_j, each [..., N_j]] in x's dtype. One call of polymodal's kernel when all
    are quantized layers of one kind on it (one activation quantization, one parallel region:
    the same numbers as calling them one by one, fewer calls per decode step); otherwise
    each layer's own call."""
    plan = _shared_plan(layers)
    if plan is None:
        return [layer(x) for layer in layers]
    if x.requires_grad and torch.is_grad_enabled():
        raise UserError("quantized LLM layers compute without gradients (inference only): train the "
                        "float model, then quantize it")
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    out = plan(flat.contiguous())
    parts = (out,) if len(layers) == 1 else out.split(plan.sizes, dim=1)
    results = []
    for layer, part in zip(layers, parts):
        if layer.bias is not None:
            part = part + layer.bias
        if x.dtype != torch.float32:
            part = part.to(x.dtype)
        results.append(part.view(*x.shape[:-1], part.shape[-1]))
    return results


def _shared_plan(layers: tuple[nn.Module, ...]) -> quantized_matmul.Plan | None:
    """The kernel plan of these layers together (cached on the first, rebuilt when an
    operand changes), or None when they do not all run polymodal's kernel of one kind."""
    kind = type(layers[0])
    if kind not in (Int8Linear, Int4Linear) or any(type(layer) is not kind or not layer.own_kernel
                                                    for layer in layers):
        return None
    if len(layers) > quantized_matmul.Plan.MAX_MATRICES or len({layer.in_features for layer in layers}) > 1:
        return None
    if kind is Int4Linear and len({layer.group_size for layer in layers}) > 1:
        return None
    plan = kernel_plan(layers)
    if plan is None:  # none yet, or made for older operands: this one replaces it
        bits = "int8" if kind is Int8Linear else "int4"
        plan = quantized_matmul.Plan(bits, [layer.kernel_operands() for layer in layers],
                                     getattr(layers[0], "group_size", 0))
        _PLANS.setdefault(layers[0], {})[len(layers)] = (tuple(layer.operand_version for layer in layers), plan)
    return plan


def kernel_plan(layers: tuple[nn.Module, ...]) -> quantized_matmul.Plan | None:
    """The cached plan of these layers together while it holds (the same operand versions and
    pointers), else None."""
    cached = _PLANS.get(layers[0], {}).get(len(layers))
    if cached is None or cached[0] != tuple(getattr(layer, "operand_version", None) for layer in layers):
        return None
    return cached[1] if cached[1].valid() else None


def use_kernels(model: nn.Module, own: bool) -> int:
    """Switch every quantized layer of `model` to polymodal's kernels (`own`, where the CPU and
    the layer's shape allow) or to torch's; returns how many layers run polymodal's. For
    comparing the two in one process (benchmarks/generate.py)."""
    layers = [module for module in model.modules() if isinstance(module, (Int8Linear, Int4Linear))]
    for layer in layers:
        layer.use_kernel(own)
    return sum(layer.own_kernel for layer in layers)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (codes int8 [N, K] in [-127, 127], scales bfloat16 [N]), symmetric
    per output row: w ≈ codes * scales[:, None] (codes made with the scales as stored)."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(COMPUTE_DTYPE)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (codes uint8 [N, K] in [0, 15], scales_and_mins float16
    [N, K / group_size, 2]): per row and group, asymmetric min/max, w ≈ q * s + min, as
    llama.cpp's Q4_1 (ggml-quants.c, quantize_row_q4_1_ref). The codes are rounded against the
    scale and min as stored in float16 (scales at least 2^-24, float16's smallest step)."""
    weight = weight.detach().float()
    rows, inputs = weight.shape
    groups = weight.view(rows, inputs // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/group]
    scales = ((high - low) / 15).clamp(min=2**-24, max=65504).half().float()
    mins = low.clamp(-65504, 65504).half().float()
    codes = torch.round((groups - mins[..., None]) / scales[..., None]).clamp(0, 15)
    table = torch.stack([scales, mins], dim=-1).half()
    return codes.view(rows, inputs).to(torch.uint8), table


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes in 0..15 -> [N, K/2]: even inputs in the low nibble."""
    return codes[:, ::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: [N, K/2] -> uint8 [N, K]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)


def quantizable(linear: nn.Linear, settings: QuantizationConfig) -> bool:
    """Whether the CPU kernels take this layer: K a multiple of 16 (their vector loads), and for
    int4 also of the group size, with N a multiple of 16 (column blocks) and weights within
    float16's range (int4's scales and minimums are float16; a group whose range is below
    ~1e-3 gets a subnormal scale, as in llama.cpp's Q4_1)."""
    if linear.in_features % 16:
        return False
    if settings.bits == "int8":
        return True
    if linear.weight.detach().abs().max() > torch.finfo(torch.float16).max:
        return False
    return linear.in_features % settings.group_size == 0 and linear.out_features % 16 == 0


def quantized_linear(linear: nn.Linear, settings: QuantizationConfig, weight: torch.Tensor | None = None):
    """The quantized replacement of `linear` (from `weight` [N, K] when given, e.g. with a
    LoRA update folded in)."""
    weight = linear.weight if weight is None else weight
    if settings.bits == "int8":
        return Int8Linear.from_float(weight, linear.bias)
    return Int4Linear.from_float(weight, settings.group_size, linear.bias)


def quantize_model(model: nn.Module, settings: QuantizationConfig) -> nn.Module:
    """A loaded multimodal LM's decoder quantized in place (`quantize_language_model`), its
    config saying so (`model.quantization`, `merge_lora` resolved; LoRA merged clears
    `llm.lora`), so that `save_pretrained` writes a model directory that loads quantized.
    Returns the model.

    Raises:
        UserError: a model without a decoder LLM (a dual encoder), or one already quantized
            otherwise.
    """
    config = getattr(model, "config", None)
    if settings.merge_lora is None:
        settings = dataclasses.replace(settings, merge_lora=settings.bits == "int8")
    if not isinstance(getattr(model, "llm", None), nn.Module) or not hasattr(config, "quantization"):
        raise UserError(f"quantization: only a multimodal LM's decoder quantizes; this model is a "
                        f"{getattr(config, 'kind', type(model).__name__)}")
    if config.quantization is not None:
        if config.quantization == settings:  # e.g. `--quantize int8` on an int8 model directory
            return model
        raise UserError(f"quantization: the model is already quantized ({config.quantization.bits}); "
                        f"quantize the float model instead")
    quantize_language_model(model.llm.model, settings)
    lora = None if settings.merge_lora else config.llm.lora
    model.config = dataclasses.replace(config, quantization=settings, llm=dataclasses.replace(config.llm, lora=lora))
    return model


def quantize_language_model(causal_lm: nn.Module, settings: QuantizationConfig) -> int:
    """Replace the decoder's linear layers (LAYER_NAMES) of a transformers causal LM, in place,
    by quantized ones made from their current weights; the LM head as `settings.head` says
    (untied from the input embeddings, which stay float: a lookup reads one row per token).
    LoRA adapters (peft) are folded into their base weights first, by peft's own delta, or
    with `settings.merge_lora` False kept in float beside the quantized base layer (peft's
    layer adds B(A(x)) to what its base layer returns, whatever that layer is).

    Returns the number of layers replaced. Layers whose shape the kernel refuses (int4: see
    `quantizable`) stay float, and so does a head that is not a plain `nn.Linear`: a drawing
    model's `CodeHead` adds the image tokens' rows to the text rows, and a quantized text head in
    its place would drop them.
    """
    replaced = 0
    for name, module in list(causal_lm.named_modules()):
        if name.rsplit(".", 1)[-1] not in LAYER_NAMES:
            continue
        linear, weight = _base_linear(module, merge=settings.merge_lora is not False)
        if linear is None or not quantizable(linear, settings):
            continue
        if linear is not module and settings.merge_lora is False:
            module.base_layer = quantized_linear(linear, settings)  # the adapters stay around it
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(causal_lm.get_submodule(parent_name), child, quantized_linear(linear, settings, weight))
        replaced += 1
    head = causal_lm.get_output_embeddings()
    head_settings = dataclasses.replace(settings, bits=settings.head) if settings.head != "float" else None
    if head_settings is not None and type(head) is nn.Linear and quantizable(head, head_settings):
        causal_lm.config.tie_word_embeddings = False  # never re-tied onto the float embeddings
        causal_lm.set_output_embeddings(quantized_linear(head, head_settings))
        replaced += 1
    return replaced


def _base_linear(module: nn.Module, merge: bool = True) -> tuple[nn.Linear | None, torch.Tensor | None]:
    """(the plain linear layer, its weight with any active LoRA adapters folded in if `merge`)."""
    if isinstance(module, nn.Linear):
        return module, module.weight
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None, None
    if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), nn.Linear):
        return None, None
    base = module.get_base_layer()
    weight = base.weight.detach()
    if merge and not module.merged:
        with torch.no_grad():
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return base, weight
