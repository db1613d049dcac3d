"""The per-call context of fusion inside the decoder: which tokens are media, which image each
token reads, the media tokens, state kept for a request's life, auxiliary losses.

Three loops run a decoder here (the transformers forward in training, the batch runner with
its KV cache, the server's slots); each sets the context around its decoder call in its own
tensor layout, and a fusion kind's hooks (on `q_proj`, `k_proj`, `v_proj`, `o_proj`, `mlp`)
and blocks before layers read it with `current()`. Nothing is stored on modules between calls
(open_flamingo's `condition_media_locations` is the bug this avoids), and no modeling file is
forked. transformers 5 collects router outputs the same way (hooks and a context variable).

Two objects:
    FusionState   per row of the batch or cache, lives as long as its requests: the media
                  tokens [R, M, K, D], image placeholders seen so far [R], tensors a kind
                  computes once per request (cross-attention keys and values), sliced as rows
                  leave (`select_rows`), move (`move_row`) or join (`put_row`).
    FusionCall    one decoder call: the new tokens' rows, media mask and image index in the
                  [B, T] grid, `real` (the grid cells that are tokens, when the call packs
                  them as [N, D]), and the auxiliary losses the call collects.

Layouts: a hook sees hidden states [B, T, X] (transformers' forward: every grid cell) or
[N, X] (the LlamaDecoder step: the real cells, row-major). `tokens(x)` gives [N, X] either
way with the call's per-token tensors in the same order; `to_grid`/`from_grid` convert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

_CURRENT: ContextVar[FusionCall | None] = ContextVar("polymodal_fusion_call", default=None)


def current() -> FusionCall | None:
    """The decoder call running now, or None (a plain LLM call: text only)."""
    return _CURRENT.get()


class FusionState:
    """What a batch of rows carries from call to call (prefill, then each decoded token).

    media: [R, M, K, D] each row's images' tokens from the connector (zeros past a row's
        count), or None for a text-only batch; `media_count` [R] how many each row has.
    seen: [R] image placeholder tokens each row has fed so far: a new token's image index is
        (seen + its cumulative count - 1) // tokens_per_medium, -1 before the first image.
    cache: name -> tensor [R, M, ...] a kind computes once per request (keys and values of its
        media) at its first use in a call, for every row; sliced with the rows.
    """

    def __init__(self, media: torch.Tensor | None, media_count: torch.Tensor, placeholder_ids: list[int],
                 image_id: int, tokens_per_medium: int):
        self.media, self.media_count = media, media_count
        self.placeholder_ids, self.image_id = placeholder_ids, image_id
        self.tokens_per_medium = tokens_per_medium
        self.seen = torch.zeros_like(media_count)
        self.cache: dict[str, torch.Tensor] = {}
        self.fusion = None  # the DecoderFusion whose `before_layer` the runners call

    @property
    def rows(self) -> int:
        return len(self.seen)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep these rows [R'] in this order (rows leave a batch, or prefixes become rows)."""
        self.seen, self.media_count = self.seen[rows], self.media_count[rows]
        if self.media is not None:
            self.media = self.media[rows]
        self.cache = {name: tensor[rows] for name, tensor in self.cache.items()}

    def move_row(self, source: int, target: int) -> None:
        """Row `source`'s state into row `target` (the server's slots stay contiguous)."""
        for tensor in (self.seen, self.media_count, self.media, *self.cache.values()):
            if tensor is not None:
                tensor[target] = tensor[source]

    def put_row(self, row: int, other: FusionState) -> None:
        """Row 0 of `other` (a one-row state) becomes row `row` (at most one past the last);
        media and cached tensors are padded to the larger image count of the two."""
        if row > self.rows:
            raise RuntimeError(f"row {row} is past the state's {self.rows} rows")
        before, grow = self.rows, row == self.rows
        self.seen = _put(self.seen, row, other.seen, grow)
        self.media_count = _put(self.media_count, row, other.media_count, grow)
        self.media = _put_padded(self.media, row, other.media, grow, before)
        # A tensor only one side has computed is dropped: its kind recomputes it for every row
        # at its next use (what an admitted request costs once), rather than read zeros.
        self.cache = {name: _put_padded(self.cache[name], row, other.cache[name], grow, before)
                      for name in set(self.cache) & set(other.cache)}

    def truncate(self, rows: int) -> None:
        """Keep rows 0..rows-1 (the server's running block shrank)."""
        self.select_rows(torch.arange(rows))

    @contextmanager
    def call(self, input_ids: torch.Tensor, rows: torch.Tensor | slice | None = None,
             real: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None) -> Iterator[FusionCall]:
        """Run one decoder call of the tokens input_ids [B, T] (the grid; padding included)
        of state rows `rows` (None: all rows, in order); `real` [B, T] marks the cells the call
        packs as [N, D] (None: the hooks see every cell, [B, T, D]); branch_ids [B, T]: rows of
        a shared prefix (0) and branches (`processing.branches`), where a token reads only
        images of the prefix or its own branch. Counts the image placeholders the call feeds
        into `seen` when it ends without error."""
        batch, length = input_ids.shape
        index = torch.arange(self.rows)[rows if rows is not None else slice(None)]
        media_mask = torch.isin(input_ids, torch.tensor(self.placeholder_ids))
        images = (input_ids == self.image_id).long()
        counted = self.seen[index][:, None] + images.cumsum(-1)  # [B, T] image placeholders so far
        media_index = torch.div(counted - 1, self.tokens_per_medium, rounding_mode="floor").clamp(min=-1)
        if branch_ids is not None:
            media_index = _within_branches(media_index, images.bool(), branch_ids)
        fusion_call = FusionCall(self, index, media_mask, media_index, real, (batch, length))
        token = _CURRENT.set(fusion_call)
        try:
            yield fusion_call
        finally:
            _CURRENT.reset(token)
        self.seen[index] += images.sum(-1)


def _within_branches(media_index: torch.Tensor, images: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """media_index [B, T] -> the index of the latest image at or before each token among those
    in the shared prefix (branch 0) or the token's own branch; -1 where there is none.
    images [B, T] bool: image placeholder cells. [B, T, T] work: training rows only."""
    length = branch_ids.shape[1]
    before = torch.ones(length, length, dtype=torch.bool).tril()  # [t, s]: s <= t
    same = (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])  # [B, t, s]
    visible = images[:, None, :] & before & same
    return torch.where(visible, media_index[:, None, :], -1).amax(-1)


def _put(tensor: torch.Tensor, row: int, value: torch.Tensor, grow: bool) -> torch.Tensor:
    if grow:
        return torch.cat([tensor, value[:1]])
    tensor[row] = value[0]
    return tensor


def _put_padded(tensor: torch.Tensor | None, row: int, value: torch.Tensor | None, grow: bool,
                rows: int) -> torch.Tensor | None:
    """Put value[0] [M', ...] at `row` of tensor [rows, M, ...], padding axis 1 with zeros to
    the larger of M and M'; a missing side counts as rows without images."""
    if tensor is None and value is None:
        return None
    if tensor is None:
        tensor = value.new_zeros(rows, *value.shape[1:])
    if value is None:
        value = tensor.new_zeros(1, *tensor.shape[1:])
    width = max(tensor.shape[1], value.shape[1])
    return _put(_pad_axis1(tensor, width), row, _pad_axis1(value, width), grow)


def _pad_axis1(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, pad], dim=1)


@dataclass
class FusionCall:
    """One decoder call's tokens (see the module docstring for the layouts).

    rows: [B] the state rows of the grid's rows. media_mask: [B, T] bool, media placeholder
    cells (any modality). media_index: [B, T] the image each cell reads (-1: none before it).
    real: [B, T] bool or None. grid: (B, T). aux_losses: losses the call's hooks add (a
    router's load balancing), summed into the training loss. scratch: values one hook hands a
    later hook of the same call (a layer's queries to its output projection); gone with the call.
    """

    state: FusionState
    rows: torch.Tensor
    media_mask: torch.Tensor
    media_index: torch.Tensor
    real: torch.Tensor | None
    grid: tuple[int, int]
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)  # what one hook leaves for a later one in this call

    def per_token(self, grid_values: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] per-cell values -> [N, ...] in the order the hooks see tokens."""
        if self.real is None:
            return grid_values.reshape(-1, *grid_values.shape[2:])
        return grid_values[self.real]

    @property
    def token_media_mask(self) -> torch.Tensor:
        """[N] bool: the tokens that are media."""
        return self.per_token(self.media_mask)

    @property
    def token_rows(self) -> torch.Tensor:
        """[N] the state row of each token."""
        return self.per_token(self.rows[:, None].expand(self.grid))

    @property
    def token_media_index(self) -> torch.Tensor:
        """[N] the image each token reads, -1 for none."""
        return self.per_token(self.media_index)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states as a hook sees them ([B, T, X] or [N, X]) -> [B, T, X], zeros at padding."""
        if tokens.dim() == 3:
            return tokens
        if self.real is None:
            return tokens.view(*self.grid, tokens.shape[-1])
        out = tokens.new_zeros(*self.grid, tokens.shape[-1])
        out[self.real] = tokens
        return out

    def from_grid(self, grid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[B, T, X] -> the layout of `like` ([B, T, X] or [N, X])."""
        if like.dim() == 3:
            return grid
        return self.per_token(grid)
