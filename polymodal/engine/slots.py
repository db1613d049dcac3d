"""A KV cache of slots for continuous batching: requests join and leave the running batch
between decode steps, each in its own slot with its own length and positions.

Rows 0..n-1 of the cache are the running requests. A new request is prefilled on its own
(`LlamaRunner`, batch 1) and its keys and values copied into row n; a finished one is
replaced by the last running row, so the running rows stay a contiguous block and a
decode step works on views of the cache, never on gathered copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.engine.runners import LlamaRunner, _rms_norm, _rotate_half


class SlotCache:
    """Keys/values [max_batch, H_kv, max_length, head_dim] per layer for one Llama-family model."""

    def __init__(self, model, max_batch: int, max_length: int):
        self.runner = LlamaRunner(model)  # its modules, shapes and rotary table
        self.max_batch, self.max_length = max_batch, max_length
        first = next(model.parameters())
        shape = (max_batch, self.runner.kv_heads, max_length, self.runner.head_dim)
        layers = len(self.runner.body.layers)
        self.keys = [first.new_zeros(shape) for _ in range(layers)]
        self.values = [first.new_zeros(shape) for _ in range(layers)]
        self.key_mask = torch.zeros(max_batch, max_length, dtype=torch.bool)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # slots filled per row
        self.positions = torch.zeros(max_batch, dtype=torch.long)  # position of each row's next token
        cos, sin = self.runner.body.rotary_emb(first.new_zeros(1), torch.arange(max_length)[None])
        self.rotary = (cos[0], sin[0])
        self.active = 0  # rows 0..active-1 are running

    def admit(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill one prompt (embeds [1, T, D]) into the next free row; its logits [1, V]."""
        if self.active == self.max_batch:
            raise RuntimeError("no free slot")
        length = embeds.shape[1]
        logits = self.runner.prefill(embeds, torch.ones(1, length, dtype=torch.long), length)
        row = self.active
        for layer, (keys, values) in enumerate(zip(self.runner.keys, self.runner.values)):
            self.keys[layer][row, :, :length] = keys[0]
            self.values[layer][row, :, :length] = values[0]
        self.key_mask[row] = False
        self.key_mask[row, :length] = True
        self.lengths[row], self.positions[row] = length, length
        self.active += 1
        return logits

    def release(self, row: int) -> int | None:
        """Free a row; the last running row moves into it. Returns the row that moved (its
        new index is `row`), or None."""
        last = self.active - 1
        if row != last:
            for keys, values in zip(self.keys, self.values):
                keys[row] = keys[last]
                values[row] = values[last]
            for table in (self.key_mask, self.lengths, self.positions):
                table[row] = table[last]
        self.active -= 1
        return last if row != last else None

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [n] for the running rows -> next logits [n, V]; one slot more per row."""
        n, runner = self.active, self.runner
        rows, at = torch.arange(n), self.lengths[:n].clone()
        self.key_mask[rows, at] = True
        span = int(at.max()) + 1  # attend only over the longest row's slots
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
