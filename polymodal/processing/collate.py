"""Pad a list of encoded samples into one `Batch`, once."""

from __future__ import annotations

import torch

from polymodal.processing.batch import IGNORE, Batch

__all__ = ["IGNORE", "collate"]  # IGNORE stays importable from here (processor, tests)


def collate(samples: list[dict], pad_id: int, left_pad: bool = False) -> Batch:
    """Samples -> a `Batch`, every field filled.

    A sample is {input_ids, labels?, media?: modality -> encoder inputs [N_i, ...],
    position_ids?, branch_ids?} (`pixel_values` [N_i, 3, S, S] is the image modality's
    media, as processors spelled it before modalities). The batch holds input_ids,
    attention_mask, position_ids and sample_ids [B, T]; labels [B, T] when every sample has
    them; media concatenated per modality in reading order; branch_ids [B, T] when a sample
    shares a prefix among branches (`processing.branches`). Generation pads on the left so
    that every row's last token is at the end.
    """
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    has_labels = all("labels" in sample for sample in samples)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long) if has_labels else None
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        span = slice(length - n, length) if left_pad else slice(0, n)
        input_ids[row, span] = torch.as_tensor(sample["input_ids"])
        attention_mask[row, span] = 1
        if labels is not None:
            labels[row, span] = torch.as_tensor(sample["labels"])
    # Plain rows count positions over their tokens (padding repeats an edge position: it is
    # never attended to); rows of branches bring their own.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    branch_ids = None
    if any("branch_ids" in sample for sample in samples):
        position_ids, branch_ids = _branch_layout(samples, length)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                 media=_media(samples), sample_ids=_sample_ids(len(samples), length, branch_ids),
                 branch_ids=branch_ids)


def _media(samples: list[dict]) -> dict[str, torch.Tensor]:
    """modality -> the samples' encoder inputs concatenated in reading order."""
    gathered: dict[str, list[torch.Tensor]] = {}
    for sample in samples:
        media = dict(sample.get("media") or {})
        if sample.get("pixel_values") is not None:
            media["image"] = sample["pixel_values"]
        for modality, inputs in media.items():
            if inputs is not None:
                gathered.setdefault(modality, []).append(inputs)
    return {modality: torch.cat(parts) for modality, parts in gathered.items()}


def _branch_layout(samples: list[dict], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids and branch_ids [B, T], right-padded; a plain sample is one prefix."""
    positions = torch.zeros((len(samples), length), dtype=torch.long)
    branches = torch.full((len(samples), length), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        positions[row, :n] = torch.as_tensor(sample.get("position_ids", range(n)))
        branches[row, :n] = torch.as_tensor(sample.get("branch_ids", [0] * n))
    return positions, branches


def _sample_ids(rows: int, length: int, branch_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, T]: which sample each token belongs to, numbered across the batch: the row, or
    the row's branch when a row holds several samples over a shared prefix."""
    row = torch.arange(rows)[:, None].expand(rows, length)
    if branch_ids is None:
        return row
    branches = branch_ids.clamp(min=0)  # padding (-1) carries no labels
    return row * (int(branches.max()) + 1) + branches
