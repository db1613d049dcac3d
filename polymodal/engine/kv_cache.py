"""The KV cache: every decoder layer's keys and values for a batch of rows, one object for
the batch runner (`LlamaRunner`) and the server's continuous-batching slots (`SlotCache`).

Layout (rows are sequences, slots are the cache positions a row's tokens are written to):

    keys[layer], values[layer]   [rows, H_kv, slots, head_dim]
    key_mask                     [rows, slots] bool: the slot holds a real token of its row

A row's tokens take slots in the order they are fed. Left padding takes slots too (False
in key_mask), so a slot is not a position: rotary positions count real tokens only and are
kept by the caller. Rows and slots are allocated up front (the runner: the batch and its
longest prompt plus the new tokens) or grown by doubling (the slots), never per token.
Preallocated and written in place, as nanochat's `KVCache` (karpathy/nanochat,
nanochat/engine.py), where transformers' `DynamicCache` concatenates a new tensor each step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values [rows, H_kv, slots, head_dim] per decoder layer and the mask of the
    slots that hold real tokens [rows, slots]."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], key_mask: torch.Tensor):
        self.keys, self.values, self.key_mask = keys, values, key_mask

    @classmethod
    def empty(cls, layers: int, rows: int, kv_heads: int, slots: int, head_dim: int,
              like: torch.Tensor) -> KVCache:
        """Zeros in the dtype and device of `like`; nothing is assigned before every layer
        is allocated, so running out of memory here leaves any older cache as it was."""
        keys = [like.new_zeros(rows, kv_heads, slots, head_dim) for _ in range(layers)]
        values = [like.new_zeros(rows, kv_heads, slots, head_dim) for _ in range(layers)]
        return cls(keys, values, torch.zeros(rows, slots, dtype=torch.bool))

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, slots per row) allocated."""
        return tuple(self.key_mask.shape)

    def write(self, layer: int, rows: torch.Tensor | slice, slots: torch.Tensor | slice, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store keys and values in `layer`. Index tensors rows, slots [N]: token i's keys[i]
        and values[i] [N, H_kv, head_dim] at (rows[i], slots[i]) (a scatter). Slices: keys
        and values [B, H_kv, T, head_dim] at `rows` x `slots`, every row's tokens at the same
        slots (one strided copy, cheaper than the scatter)."""
        self.keys[layer][rows, :, slots] = keys
        self.values[layer][rows, :, slots] = values

    def read(self, layer: int, rows: slice, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of `rows`' keys and values over slots 0..span-1: [B, H_kv, span, head_dim] each."""
        return self.keys[layer][rows, :, :span], self.values[layer][rows, :, :span]

    def attention_mask(self, rows: slice, query_slots: torch.Tensor, span: int) -> torch.Tensor | None:
        """Which keys each query sees: [B, 1, T, span] bool, or None when it would be all True.

        query_slots [B or 1, T]: the slot of each query token of `rows`. A query sees the real
        keys at or before its own slot (causal); a padding query sees only itself, so that
        softmax stays finite. One query per row (decoding) needs no causal part: no slot
        after it has been written yet.
        """
        keys = self.key_mask[rows, :span]  # [B, S]
        if query_slots.shape[-1] == 1:
            return None if bool(keys.all()) else keys[:, None, None, :]
        key_at = torch.arange(span)
        query_at = query_slots[:, None, :, None]  # [B, 1, T, 1]
        return (keys[:, None, None, :] & (key_at <= query_at)) | (key_at == query_at)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] in that order (a row may repeat: a shared prefix copied into
        each of its rows)."""
        self.keys = [keys[index] for keys in self.keys]
        self.values = [values[index] for values in self.values]
        self.key_mask = self.key_mask[index]

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (keys, values and mask)."""
        for keys, values in zip(self.keys, self.values):
            keys[target] = keys[source]
            values[target] = values[source]
        self.key_mask[target] = self.key_mask[source]

    def grown(self, rows: int, slots: int, keep_rows: int, keep_slots: int) -> KVCache:
        """A new cache of `rows` x `slots` holding this one's first `keep_rows` rows and
        `keep_slots` slots. Built aside: if an allocation fails (out of memory), this cache
        is unchanged."""
        keys, values = [], []
        for old_keys, old_values in zip(self.keys, self.values):
            for table, source in ((keys, old_keys), (values, old_values)):
                grown = source.new_zeros(rows, source.shape[1], slots, source.shape[3])
                grown[:keep_rows, :, :keep_slots] = source[:keep_rows, :, :keep_slots]
                table.append(grown)
        key_mask = torch.zeros(rows, slots, dtype=torch.bool)
        key_mask[:keep_rows, :keep_slots] = self.key_mask[:keep_rows, :keep_slots]
        return KVCache(keys, values, key_mask)

    def elements(self) -> int:
        """Numbers held in keys and values (for memory accounting and tests)."""
        return sum(tensor.numel() for tensor in [*self.keys, *self.values])
