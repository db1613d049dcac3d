"""Shared-prefix rows: several training examples that begin alike, in one row.

The samples of a batch all begin with the same system prompt (and those about one image
with its tokens too). One row holds that prefix once, then each example's remainder (a
branch) after it:

    [ prefix | branch 1 | branch 2 | ... ]   positions: 0..P-1 | P.. | P.. | ...

A branch attends to the prefix and to its own earlier tokens, never to another branch, and
its positions continue from the prefix as they would alone. So every label sees exactly
the context it has in its own sequence (the loss is the same), at fewer tokens: easy-VQA's
one-question samples are ~33 tokens, 11 of them the system prompt's. The inference
counterpart is `engine.generate.shared_prefixes`.
"""

from __future__ import annotations

import torch

from polymodal.processing.collate import IGNORE

PREFIX = 0  # branch id of the shared prefix; branches are 1, 2, ...; padding is -1


def common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading ids all rows have in common."""
    common = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        common += 1
    return common


def shared_prefix_length(examples: list[dict], image_token_id: int | None = None,
                         tokens_per_image: int = 1) -> int:
    """How many leading tokens all examples share and may share: their common ids, ending
    before the token that predicts their first label (that position must belong to each
    branch, which holds the label's own loss), before the first image that differs among
    them (placeholder ids are equal whatever the image) and never inside an image's tokens."""
    common = common_prefix_length([e["input_ids"] for e in examples])
    first_labels = [next((i for i, label in enumerate(e["labels"]) if label != IGNORE), len(e["labels"]))
                    for e in examples]
    limit = max(0, min(common, min(first_labels) - 1))
    seen = 0  # image placeholder tokens before the position
    for position, token in enumerate(examples[0]["input_ids"][:limit]):
        if token != image_token_id:
            continue
        image = seen // tokens_per_image
        if any(e["images"][image] != examples[0]["images"][image] for e in examples):
            return position - seen % tokens_per_image  # the start of this image's tokens
        seen += 1
    return limit - seen % tokens_per_image  # an image cut at the limit stays whole in the branches


def merge_branches(examples: list[dict], image_token_id: int | None = None, tokens_per_image: int = 1) -> dict:
    """Examples -> one example {input_ids, labels, position_ids, branch_ids, images} holding
    their shared prefix once; a single example comes back unchanged."""
    if len(examples) < 2:
        return examples[0]
    prefix = shared_prefix_length(examples, image_token_id, tokens_per_image)
    shared_images = examples[0]["input_ids"][:prefix].count(image_token_id) // tokens_per_image
    ids = list(examples[0]["input_ids"][:prefix])
    labels = [IGNORE] * prefix
    positions = list(range(prefix))
    branch_ids = [PREFIX] * prefix
    images = list(examples[0]["images"][:shared_images])
    for branch, example in enumerate(examples, start=1):
        rest = len(example["input_ids"]) - prefix
        ids += example["input_ids"][prefix:]
        labels += example["labels"][prefix:]
        positions += range(prefix, prefix + rest)
        branch_ids += [branch] * rest
        images += example["images"][shared_images:]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "branch_ids": branch_ids,
            "images": images}


def branch_attention_mask(branch_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """branch_ids [B, T] (PREFIX, branch, or -1 for padding), attention_mask [B, T] ->
    a boolean mask [B, 1, T, T], True where a query may attend to a key."""
    length = branch_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch_ids.device).tril()  # [T, T]
    query, key = branch_ids[:, :, None], branch_ids[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal & ((key == PREFIX) | (key == query)) & attention_mask[:, None, :].bool() & (query >= 0)
    # A padding query sees only itself: a row with no allowed key would make NaN in softmax.
    allowed |= torch.eye(length, dtype=torch.bool, device=branch_ids.device)
    return allowed[:, None]


def sample_ids(batch: dict) -> torch.Tensor:
    """[B, T]: which sample each token belongs to, numbered across the batch: the row, or
    the row's branch when a row holds several samples over a shared prefix."""
    rows, length = batch["input_ids"].shape
    row = torch.arange(rows, device=batch["input_ids"].device)[:, None].expand(rows, length)
    if "branch_ids" not in batch:
        return row
    branches = batch["branch_ids"].clamp(min=0)  # padding (-1) carries no labels
    return row * (int(branches.max()) + 1) + branches
