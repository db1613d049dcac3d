"""A whole decoding step of a Llama-family decoder in one C call (`decoder_step.c`): every
layer for one new token per row, with the matrix products of `quantized_matmul` (int8, int4)
or a float32 one of the same design.

Why: at batch 1 the eager step around the products (RMSNorm, rotary, cache writes,
attention, residuals, SiLU; ~25 torch ops and 4 kernel calls a layer) cost more than the
products themselves; measured in benchmarks/RESULTS.md ("the decoding step in one call").

This module knows tensors, not models: `polymodal.engine.decoder_kernel` gathers a model's
weights into `LayerWeights` and its cache into the call.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from polymodal.kernels import quantized_matmul

KINDS = {"float32": 0, "int8": 1, "int4": 2}
# Above this many rows the float32 product (4 rows of weights against one activation row at a
# time) loses to torch's GEMM, which reuses each weight across rows in registers: SmolLM2's
# step, one call vs eager, was 1.33x at 8 rows, 1.02x at 16, 0.78x at 32, 0.65x at 64 (2 cores,
# 2026-11-30). The int8/int4 products won at every batch tried (1.13-1.26x at 32 and 64 rows).
FLOAT32_MAX_ROWS = 16
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")  # the C struct's order
_pointer = ctypes.c_void_p


class _Matrix(ctypes.Structure):
    _fields_ = [("weight", _pointer), ("scales", _pointer), ("mins", _pointer), ("bias", _pointer),
                ("rows", ctypes.c_int64), ("lora_a", _pointer), ("lora_b", _pointer), ("rank", ctypes.c_int64),
                ("lora_scale", ctypes.c_float)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _pointer), ("post_attention_norm", _pointer)] + [(name, _Matrix) for name in MATRICES]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("slots", ctypes.c_int64),
                ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("kind", ctypes.c_int), ("group", ctypes.c_int), ("eps", ctypes.c_float)]


@dataclass
class LayerWeights:
    """One decoder layer's operands. Norm weights float32 [D]; `matrices`: for each of MATRICES
    (weight, scales, mins, bias, lora): float32 (weight [N, K], None, None, bias, lora); int8
    (weight int8 [N, K], scales float32 [N], None, bias, lora); int4 (packed uint8 [N, K/2] in
    `quantized_matmul.int4_layout`, scales and mins float16 [N, K/group], bias, lora). bias
    float32 [N] or None; lora: None, or a LoRA adapter kept beside the layer (peft),
    (A float32 [r, K], B float32 [N, r], scale) adding scale * B (A x)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    matrices: tuple[tuple[torch.Tensor | None, ...], ...]


class DecoderStep:
    """Every layer of a Llama-family decoder for M new tokens, one per cache row, in one call.

    Holds the operands it points into (and aliases of their memory, so a call never reads
    freed memory); `valid()` is False once one has moved, and the caller builds a new step. Shapes: D hidden, I intermediate, H heads, H_kv key-value heads, hd
    head_dim.
    """

    def __init__(self, kind: str, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int,
                 eps: float, group_size: int = 0):
        """kind: "float32", "int8" or "int4" (all matrices of one kind).

        Raises ValueError if the kernels are unavailable here, a shape is one the products
        refuse (D, I and H*hd multiples of 64), or an operand is not a contiguous CPU tensor
        of the documented shape and dtype."""
        self.library = quantized_matmul.library()
        hidden = layers[0].input_norm.shape[0]
        intermediate = layers[0].matrices[MATRICES.index("gate")][0].shape[0]
        if self.library is None or any(size % 64 for size in (hidden, intermediate, heads * head_dim)):
            raise ValueError(f"decoder step: kernels unavailable or D={hidden}, I={intermediate}, "
                             f"H*hd={heads * head_dim} not multiples of 64")
        if kv_heads < 1 or heads % kv_heads or head_dim % 2 or (kind == "int4" and group_size not in (32, 64)):
            raise ValueError(f"decoder step: heads {heads}/{kv_heads}, head_dim {head_dim}, group {group_size}")
        rows = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim, "o": hidden,
                "gate": intermediate, "up": intermediate, "down": hidden}
        inputs = {"q": hidden, "k": hidden, "v": hidden, "o": heads * head_dim, "gate": hidden, "up": hidden,
                  "down": intermediate}
        self.tensors: list[torch.Tensor] = []
        self._aliases: list[torch.Tensor] = []
        self._layers = (_Layer * len(layers))()
        for target, layer in zip(self._layers, layers):
            target.input_norm = self._hold(layer.input_norm, (hidden,), torch.float32)
            target.post_attention_norm = self._hold(layer.post_attention_norm, (hidden,), torch.float32)
            for name, operands in zip(MATRICES, layer.matrices):
                setattr(target, name, self._matrix(kind, operands, rows[name], inputs[name], group_size))
        self._pointers = [tensor.data_ptr() for tensor in self.tensors]
        self.shape = _Shape(hidden, intermediate, 0, heads, kv_heads, head_dim, KINDS[kind], group_size, eps)
        self.count, self.hidden, self.kind = len(layers), hidden, kind
        self.max_rows = FLOAT32_MAX_ROWS if kind == "float32" else None

    def _hold(self, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Keep `tensor` alive and return its address, after checking what C will read."""
        if tensor is None:
            return None
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_cpu or not tensor.is_contiguous():
            raise ValueError(f"decoder step: expected a contiguous CPU {dtype} tensor of {shape}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
        self.tensors.append(tensor)
        self._aliases.append(tensor.detach())  # keeps the memory alive even if `tensor.data` is swapped
        return tensor.data_ptr()

    def _matrix(self, kind: str, operands: tuple, rows: int, inputs: int, group_size: int) -> _Matrix:
        weight, scales, mins, bias, lora = operands
        if kind == "float32":
            pointers = (self._hold(weight, (rows, inputs), torch.float32), None, None)
        elif kind == "int8":
            pointers = (self._hold(weight, (rows, inputs), torch.int8),
                        self._hold(scales, (rows,), torch.float32), None)
        else:
            groups = (rows, inputs // group_size)
            pointers = (self._hold(weight, (rows, inputs // 2), torch.uint8),
                        self._hold(scales, groups, torch.float16), self._hold(mins, groups, torch.float16))
        if None in pointers[:1 if kind == "float32" else 2 if kind == "int8" else 3]:
            raise ValueError(f"decoder step: a {kind} matrix lacks an operand")
        adapter = (None, None, 0, 0.0)
        if lora is not None:
            down, up, scale = lora
            rank = down.shape[0]
            adapter = (self._hold(down, (rank, inputs), torch.float32), self._hold(up, (rows, rank), torch.float32),
                       rank, float(scale))
        return _Matrix(*pointers, self._hold(bias, (rows,), torch.float32), rows, *adapter)

    def covers(self, rows: int) -> bool:
        """Whether a call of `rows` new tokens is faster here than the eager step."""
        return self.max_rows is None or rows <= self.max_rows

    def valid(self) -> bool:
        """Whether every operand still lives where the step points."""
        return all(tensor.data_ptr() == pointer for tensor, pointer in zip(self.tensors, self._pointers))

    def __call__(self, hidden: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 key_mask: torch.Tensor, cache_rows: torch.Tensor, slots: torch.Tensor, span: int,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden [M, D] float32, the new tokens -> the last layer's output [M, D] (before the
        final norm). Token m goes to cache row cache_rows[m], slot slots[m] (int64 [M]) of
        every layer's keys[l] and values[l] (float32 [R, H_kv, S, hd], written in place);
        attention reads slots 0..span-1 where key_mask (bool [R, S], the new slots already
        marked); cos, sin [M, hd] the rotary table at each token's position.

        Raises ValueError on any operand of the wrong shape, dtype or range (nothing written),
        MemoryError if the C side runs out of memory.
        """
        batch = hidden.shape[0]
        cache_shape = keys[0].shape
        self._check_call(hidden, keys, values, key_mask, cache_rows, slots, span, cos, sin)
        out = hidden.clone(memory_format=torch.contiguous_format)
        shape = _Shape.from_buffer_copy(self.shape)
        shape.slots = cache_shape[2]
        key_pointers = (_pointer * self.count)(*(tensor.data_ptr() for tensor in keys))
        value_pointers = (_pointer * self.count)(*(tensor.data_ptr() for tensor in values))
        failed = self.library.llama_decode_step(
            ctypes.addressof(self._layers), self.count, ctypes.addressof(shape), out.data_ptr(), batch,
            key_pointers, value_pointers, key_mask.data_ptr(), cache_rows.data_ptr(), slots.data_ptr(), span,
            cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError("llama_decode_step: out of memory")
        return out

    def _check_call(self, hidden, keys, values, key_mask, cache_rows, slots, span, cos, sin) -> None:
        """What C will index, checked before the call: a wrong row or slot would write outside
        the cache."""
        batch, (rows, kv_heads, capacity, head_dim) = hidden.shape[0], keys[0].shape
        shape = self.shape
        ok = (hidden.dim() == 2 and hidden.shape[1] == self.hidden and hidden.dtype == torch.float32
              and hidden.is_cpu and len(keys) == len(values) == self.count
              and (kv_heads, head_dim) == (shape.kv_heads, shape.head_dim)
              and all(t.shape == keys[0].shape and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
                      for t in (*keys, *values))
              and key_mask.dtype == torch.bool and tuple(key_mask.shape) == (rows, capacity)
              and key_mask.is_contiguous() and 0 < span <= capacity)
        ok = ok and key_mask.is_cpu
        for index, upper in ((cache_rows, rows), (slots, span)):
            ok = ok and index.dtype == torch.int64 and tuple(index.shape) == (batch,) and index.is_contiguous()
            ok = ok and index.is_cpu
            ok = ok and batch > 0 and int(index.min()) >= 0 and int(index.max()) < upper
        for table in (cos, sin):
            ok = (ok and table.dtype == torch.float32 and tuple(table.shape) == (batch, head_dim) and table.is_cpu
                  and table.is_contiguous())
        if not ok:
            raise ValueError(f"decoder step: operands do not match the model or the cache (hidden "
                             f"{tuple(hidden.shape)}, cache {tuple(keys[0].shape)}, span {span})")
