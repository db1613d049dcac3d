"""Pad a list of encoded samples into one batch, once."""

from __future__ import annotations

import torch

IGNORE = -100  # label of positions that carry no loss


def collate(samples: list[dict], pad_id: int, left_pad: bool = False) -> dict:
    """Samples {input_ids, labels?, pixel_values? [N_i, 3, S, S]} -> a batch.

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (when given) and
    pixel_values [sum N_i, 3, S, S] in reading order (None when there are no images);
    position_ids and branch_ids [B, T] too when a sample shares a prefix among branches
    (`processing.branches`). Generation pads on the left so that every row's last token
    is at the end.
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
    pixels = [sample["pixel_values"] for sample in samples if sample.get("pixel_values") is not None]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "pixel_values": torch.cat(pixels) if pixels else None}
    if labels is not None:
        batch["labels"] = labels
    if any("branch_ids" in sample for sample in samples):
        batch.update(_branch_layout(samples, length))
    return batch


def _branch_layout(samples: list[dict], length: int) -> dict:
    """position_ids and branch_ids [B, T], right-padded; a plain sample is one prefix."""
    positions = torch.zeros((len(samples), length), dtype=torch.long)
    branches = torch.full((len(samples), length), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        positions[row, :n] = torch.as_tensor(sample.get("position_ids", range(n)))
        branches[row, :n] = torch.as_tensor(sample.get("branch_ids", [0] * n))
    return {"position_ids": positions, "branch_ids": branches}
