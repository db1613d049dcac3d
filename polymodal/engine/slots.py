"""A KV cache of slots for continuous batching: requests join and leave the running batch
between decode steps, each in its own row with its own length and positions.

Rows 0..n-1 of the cache are the running requests. A new request is prefilled straight
into row n (batch 1, through the same decoder-layer step as the batch runner); a finished
one is replaced by the last running row, so the running rows stay a contiguous block and
a decode step works on views of the cache, never on gathered copies.

Memory is taken by need: the per-layer tensors start at a few rows and `INITIAL_LENGTH`
slots and double along either axis (up to max_batch and max_length) when a request needs
more, and drop back to that size when no request runs. Allocating 16 rows of a model's full
context up front held 6.9 GB for an idle server of a 135M model.
"""

from __future__ import annotations

import torch

from polymodal.engine.decoder import LlamaDecoder, TokenLayout
from polymodal.engine.runners import fusion_call
from polymodal.fusion.context import FusionState

INITIAL_LENGTH = 256  # slots per row before any growth: a short chat without a copy
INITIAL_ROWS = 1


def _grown(have: int, need: int, most: int) -> int:
    """The capacity to hold `need`: `have` doubled until it does, at most `most`."""
    while have < need:
        have *= 2
    return min(have, most)


class SlotCache:
    """A `KVCache` (`kv`: keys/values [rows, H_kv, length, head_dim] per layer) for one
    Llama-family model, where rows <= max_batch and length <= max_length grow by doubling
    as requests need them; `lengths` and `positions` [max_batch] are kept per row."""

    def __init__(self, model, max_batch: int, max_length: int, initial_length: int = INITIAL_LENGTH):
        self.decoder = LlamaDecoder(model)
        self.max_batch, self.max_length = max_batch, max_length
        self.initial = (min(INITIAL_ROWS, max_batch), min(initial_length, max_length))
        self._first = next(model.parameters())
        self._allocate(*self.initial)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # slots filled per row
        self.positions = torch.zeros(max_batch, dtype=torch.long)  # position of each row's next token
        self._active = 0  # rows 0..active-1 are running
        self.fusion: FusionState | None = None  # a fusion inside the layers: the rows' state

    @property
    def active(self) -> int:
        """The number of running rows (rows 0..active-1)."""
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        if self.fusion is not None:
            self.fusion.truncate(value)
        if value == 0 and self.capacity != self.initial:  # idle: give the grown memory back
            self._allocate(*self.initial)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, slots per row) allocated now."""
        return self.kv.capacity

    def _allocate(self, rows: int, length: int) -> None:
        kv = self.decoder.empty_cache(rows, length, self._first)
        # The rotary table grows with the slots, since a model's context (max_length) may be
        # far longer than any request.
        rotary = self.decoder.rotary_table(length, self._first)
        self.kv, self.rotary = kv, rotary  # assigned together, after every allocation succeeded

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
        kv = self.kv.grown(rows, length, n, span)
        rotary = self.decoder.rotary_table(length, self._first)
        self.kv, self.rotary = kv, rotary

    def admit(self, embeds: torch.Tensor, fusion: FusionState | None = None,
              input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill one prompt (embeds [1, T, D], T <= max_length) into the next free row; its
        logits [1, V]. A fusion inside the layers gives the prompt's one-row state and its ids
        [1, T]. Raises RuntimeError when all max_batch rows are running."""
        if self._active == self.max_batch:
            raise RuntimeError("no free slot")
        length, row = embeds.shape[1], self._active
        self.decoder.forget_step()  # a new prompt: the model is looked at again
        self._reserve(row + 1, length)
        self.kv.key_mask[row] = False  # what a row that ran here before left
        slots = torch.arange(length)[None]  # [1, T]: slots and positions alike
        layout = TokenLayout.place(self.kv, self.rotary, slice(row, row + 1), slots, slots)
        call = fusion_call(None, None)
        if fusion is not None:
            if self.fusion is None:
                self.fusion = fusion  # the first request: its one row is row 0
            else:
                self.fusion.truncate(row)  # drops a row a failed admit left past the running block
                self.fusion.put_row(row, fusion)
            call = self.fusion.call(input_ids, rows=torch.tensor([row]))
        with call:
            hidden = self.decoder.run(embeds[0], self.kv, layout)  # [T, D]
        self.lengths[row], self.positions[row] = length, length
        self._active += 1
        return self.decoder.logits(hidden[-1:])

    def release(self, row: int) -> int | None:
        """Free a row; the last running row moves into it. Returns the row that moved (its
        new index is `row`), or None."""
        last = self._active - 1
        if row != last:
            self.kv.move_row(last, row)
            if self.fusion is not None:
                self.fusion.move_row(last, row)
            for table in (self.lengths, self.positions):
                table[row] = table[last]
        self.active = last
        return last if row != last else None

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [n] for the running rows -> next logits [n, V]; one slot more per row."""
        n = self.active
        at = self.lengths[:n, None].clone()  # [n, 1] the slot each row's token goes to
        self._reserve(n, int(at.max()) + 1)
        layout = TokenLayout.place(self.kv, self.rotary, slice(0, n), at, self.positions[:n, None])
        with fusion_call(self.fusion, token_ids[:, None]):
            hidden = self.decoder.run(self.decoder.embed(token_ids), self.kv, layout)  # [n, D]
        self.lengths[:n] += 1
        self.positions[:n] += 1
        return self.decoder.logits(hidden)

