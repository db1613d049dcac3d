"""A KV cache of slots for continuous batching: requests join and leave the running batch
between decode steps, each in its own slot with its own length and positions.

Rows 0..n-1 of the cache are the running requests. A new request is prefilled on its own
(`LlamaRunner`, batch 1) and its keys and values copied into row n; a finished one is
replaced by the last running row, so the running rows stay a contiguous block and a
decode step works on views of the cache, never on gathered copies.

Memory is taken by need: the per-layer tensors start at a few rows and `INITIAL_LENGTH`
slots and double along either axis (up to max_batch and max_length) when a request needs
more, and drop back to that size when no request runs. Allocating 16 rows of a model's full
context up front held 6.9 GB for an idle server of a 135M model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.engine.runners import LlamaRunner, _rms_norm, _rotate_half

INITIAL_LENGTH = 256  # slots per row before any growth: a short chat without a copy
INITIAL_ROWS = 1


def _grown(have: int, need: int, most: int) -> int:
    """The capacity to hold `need`: `have` doubled until it does, at most `most`."""
    while have < need:
        have *= 2
    return min(have, most)


class SlotCache:
    """Keys/values [rows, H_kv, length, head_dim] per layer for one Llama-family model, where
    rows <= max_batch and length <= max_length grow by doubling as requests need them."""

    def __init__(self, model, max_batch: int, max_length: int, initial_length: int = INITIAL_LENGTH):
        self.runner = LlamaRunner(model)  # its modules, shapes and rotary table
        self.max_batch, self.max_length = max_batch, max_length
        self.initial = (min(INITIAL_ROWS, max_batch), min(initial_length, max_length))
        self._first = next(model.parameters())
        self._allocate(*self.initial)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # slots filled per row
        self.positions = torch.zeros(max_batch, dtype=torch.long)  # position of each row's next token
        self._active = 0  # rows 0..active-1 are running

    @property
    def active(self) -> int:
        """The number of running rows (rows 0..active-1)."""
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        if value == 0 and self.capacity != self.initial:  # idle: give the grown memory back
            self._allocate(*self.initial)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, slots per row) allocated now."""
        return tuple(self.key_mask.shape)

    def _allocate(self, rows: int, length: int) -> None:
        shape = (rows, self.runner.kv_heads, length, self.runner.head_dim)
        layers = len(self.runner.body.layers)
        keys = [self._first.new_zeros(shape) for _ in range(layers)]
        values = [self._first.new_zeros(shape) for _ in range(layers)]
        # assigned together, after every allocation succeeded: a failed one changes nothing
        self.keys, self.values = keys, values
        self.key_mask = torch.zeros(rows, length, dtype=torch.bool)
        self.rotary = self._rotary(length)

    def _rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim] for the positions the slots can hold: grown with them,
        since a model's context (max_length) may be far longer than any request."""
        positions = torch.arange(length)[None]
        cos, sin = self.runner.body.rotary_emb(self._first.new_zeros(1), positions)
        return cos[0], sin[0]

    def _reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` slots, copying the running rows over. Built
        aside and swapped in whole: an allocation that fails (out of memory) leaves the cache
        and its running rows as they were, and only the request that asked fails."""
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        rows = _grown(have_rows, rows, self.max_batch)
        length = _grown(have_length, length, self.max_length)
        n = self._active
        span = int(self.lengths[:n].max()) if n else 0
        keys, values = [], []
        for old_keys, old_values in zip(self.keys, self.values):
            for table, source in ((keys, old_keys), (values, old_values)):
                grown = source.new_zeros(rows, source.shape[1], length, source.shape[3])
                grown[:n, :, :span] = source[:n, :, :span]
                table.append(grown)
        key_mask = torch.zeros(rows, length, dtype=torch.bool)
        key_mask[:n, :span] = self.key_mask[:n, :span]
        rotary = self._rotary(length)
        self.keys, self.values, self.key_mask, self.rotary = keys, values, key_mask, rotary

    def admit(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill one prompt (embeds [1, T, D], T <= max_length) into the next free row; its
        logits [1, V]. Raises RuntimeError when all max_batch rows are running."""
        if self._active == self.max_batch:
            raise RuntimeError("no free slot")
        length = embeds.shape[1]
        logits = self.runner.prefill(embeds, torch.ones(1, length, dtype=torch.long), length)
        row = self._active
        self._reserve(row + 1, length)
        for layer, (keys, values) in enumerate(zip(self.runner.keys, self.runner.values)):
            self.keys[layer][row, :, :length] = keys[0]
            self.values[layer][row, :, :length] = values[0]
        self.runner.keys, self.runner.values = [], []  # the prompt's copy is not needed any more
        self.key_mask[row] = False
        self.key_mask[row, :length] = True
        self.lengths[row], self.positions[row] = length, length
        self._active += 1
        return logits

    def release(self, row: int) -> int | None:
        """Free a row; the last running row moves into it. Returns the row that moved (its
        new index is `row`), or None."""
        last = self._active - 1
        if row != last:
            for keys, values in zip(self.keys, self.values):
                keys[row] = keys[last]
                values[row] = values[last]
            for table in (self.key_mask, self.lengths, self.positions):
                table[row] = table[last]
        self.active = last
        return last if row != last else None

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [n] for the running rows -> next logits [n, V]; one slot more per row."""
        n, runner = self.active, self.runner
        rows, at = torch.arange(n), self.lengths[:n].clone()
        span = int(at.max()) + 1  # attend only over the longest row's slots
        self._reserve(n, span)
        self.key_mask[rows, at] = True
        mask = self.key_mask[:n, None, None, :span]  # [n, 1, 1, span]
        cos, sin = self.rotary[0][self.positions[:n]][:, None], self.rotary[1][self.positions[:n]][:, None]
        hidden = runner.body.embed_tokens(token_ids)  # [n, D]
        for index, layer in enumerate(runner.body.layers):
            attention = layer.self_attn
            normed = _rms_norm(layer.input_layernorm, hidden)
            query = attention.q_proj(normed).view(n, runner.heads, runner.head_dim)
            key = attention.k_proj(normed).view(n, runner.kv_heads, runner.head_dim)
            both = torch.cat([query, key], dim=1)  # [n, H + H_kv, hd]
            both = both * cos + _rotate_half(both) * sin
            self.keys[index][rows, :, at] = both[:, runner.heads :]
            self.values[index][rows, :, at] = attention.v_proj(normed).view(n, runner.kv_heads, runner.head_dim)
            out = F.scaled_dot_product_attention(
                both[:, : runner.heads, None], self.keys[index][:n, :, :span], self.values[index][:n, :, :span],
                attn_mask=mask, enable_gqa=runner.kv_heads != runner.heads,
            )  # [n, H, 1, hd]
            hidden = hidden + attention.o_proj(out.reshape(n, -1))
            hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
        self.lengths[:n] += 1
        self.positions[:n] += 1
        return runner.lm_head(_rms_norm(runner.body.norm, hidden))
