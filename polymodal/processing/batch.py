"""The typed batches the models' forwards take: `Batch` (a multimodal LM's rows of tokens
and media) and `PairBatch` (a dual encoder's (medium, text) pairs). `collate` fills a
`Batch` whole, so a forward reads fields, never probes for keys."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

IGNORE = -100  # label of positions that carry no loss
PREFIX = 0  # branch id of a row's shared prefix; its branches are 1, 2, ...; padding is -1


def branch_attention_mask(branch_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """branch_ids [B, T] (PREFIX, branch, or -1 for padding), attention_mask [B, T] ->
    a boolean mask [B, 1, T, T], True where a query may attend to a key: a branch sees the
    prefix and its own earlier tokens, never another branch (`processing.branches`)."""
    length = branch_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch_ids.device).tril()  # [T, T]
    query, key = branch_ids[:, :, None], branch_ids[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal & ((key == PREFIX) | (key == query)) & attention_mask[:, None, :].bool() & (query >= 0)
    # A padding query sees only itself: a row with no allowed key would make NaN in softmax.
    allowed |= torch.eye(length, dtype=torch.bool, device=branch_ids.device)
    return allowed[:, None]


def _moved(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


@dataclass
class Batch:
    """Rows of token ids with their media, padded to one length T.

    input_ids [B, T] long; attention_mask [B, T] (1 on tokens, 0 on padding); position_ids
    [B, T] (each token's position in its own sequence: a branch's continue from its shared
    prefix); labels [B, T] or None (`collate.IGNORE` where no loss is taken; token t+1 is
    predicted at position t); media: modality -> encoder inputs in placeholder order
    (`"image"`: pixels [N, 3, S, S] in [0, 1]); media_features: modality -> a frozen
    encoder's cached outputs [N, S_enc, D_enc], used instead of its `media`; sample_ids
    [B, T] or None: which sample each token belongs to, numbered across the batch (a row,
    or a row's branch); branch_ids [B, T] or None: rows holding a shared prefix (0) and
    branches (1, 2, ...; padding -1), see `processing.branches`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    media_features: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_ids: torch.Tensor | None = None
    branch_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device`."""
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       position_ids=self.position_ids.to(device), labels=move(self.labels),
                       media=_moved(self.media, device), media_features=_moved(self.media_features, device),
                       sample_ids=move(self.sample_ids), branch_ids=move(self.branch_ids))

    @property
    def num_tokens(self) -> int:
        """Tokens the decoder reads (padding excluded): what a training rate counts."""
        return int(self.attention_mask.sum())

    def decoder_attention_mask(self) -> torch.Tensor:
        """What the decoder attends with: attention_mask [B, T] for plain rows, or for rows
        of branches a boolean [B, 1, T, T] (a branch sees its prefix and itself only)."""
        if self.branch_ids is None:
            return self.attention_mask
        return branch_attention_mask(self.branch_ids, self.attention_mask)


@dataclass
class PairBatch:
    """(medium, text) pairs for a dual encoder: texts (B strings); text_ids [B] long (equal
    texts share an id, so equal captions are positives of each other); media [B, ...] the
    encoder's inputs (pixels, log-mel), or features [B, S_enc, D_enc] a frozen encoder's
    cached outputs instead (then media is None)."""

    texts: list[str]
    text_ids: torch.Tensor
    media: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return replace(self, text_ids=self.text_ids.to(device), media=move(self.media),
                       features=move(self.features))

    @property
    def num_pairs(self) -> int:
        return len(self.texts)
