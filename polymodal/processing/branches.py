"""Shared-prefix rows: several training examples that begin alike, in one row.

The samples of a batch all begin with the same system prompt (and those about one image
with its tokens too). One row holds that prefix once, then each example's remainder (a
branch) after it:

    [ prefix | branch 1 | branch 2 | ... ]   positions: 0..P-1 | P.. | P.. | ...

A branch attends to the prefix and to its own earlier tokens, never to another branch, and
its positions continue from the prefix as they would alone. So every label sees exactly
the context it has in its own sequence (the loss is the same), at fewer tokens: easy-VQA's
one-question samples are ~33 tokens, 11 of them the system prompt's. How a row attends:
`processing.batch.branch_attention_mask`. The inference counterpart is
`engine.generate.shared_prefixes`.
"""

from __future__ import annotations

from polymodal.processing.batch import IGNORE, PREFIX


def common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading ids all rows have in common."""
    common = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        common += 1
    return common


def shared_prefix_length(examples: list[dict], image_token_id: int | None = None,
                         tokens_per_image: int = 1, stop_ids: list[int] = ()) -> int:
    """How many leading tokens all examples share and may share: their common ids, ending
    before the token that predicts their first label (that position must belong to each
    branch, which holds the label's own loss), before the first image that differs among
    them (placeholder ids are equal whatever the image), never inside an image's tokens,
    and before the first placeholder of another modality (`stop_ids`: those stay in the
    branches, each with its own medium)."""
    common = common_prefix_length([e["input_ids"] for e in examples])
    first_labels = [next((i for i, label in enumerate(e["labels"]) if label != IGNORE), len(e["labels"]))
                    for e in examples]
    limit = max(0, min(common, min(first_labels) - 1))
    if stop_ids:
        limit = next((i for i, token in enumerate(examples[0]["input_ids"][:limit]) if token in stop_ids), limit)
    seen = 0  # image placeholder tokens before the position
    for position, token in enumerate(examples[0]["input_ids"][:limit]):
        if token != image_token_id:
            continue
        image = seen // tokens_per_image
        if any(e["images"][image] != examples[0]["images"][image] for e in examples):
            return position - seen % tokens_per_image  # the start of this image's tokens
        seen += 1
    return limit - seen % tokens_per_image  # an image cut at the limit stays whole in the branches


def merge_branches(examples: list[dict], image_token_id: int | None = None, tokens_per_image: int = 1,
                   stop_ids: list[int] = ()) -> dict:
    """Examples -> one example {input_ids, labels, position_ids, branch_ids, images, media_paths?}
    holding their shared prefix once; a single example comes back unchanged. Other
    modalities' placeholders (`stop_ids`) are never shared: their media go branch by branch."""
    if len(examples) < 2:
        return examples[0]
    prefix = shared_prefix_length(examples, image_token_id, tokens_per_image, stop_ids)
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
    merged = {"input_ids": ids, "labels": labels, "position_ids": positions, "branch_ids": branch_ids,
              "images": images}
    media: dict[str, list] = {}
    for example in examples:
        for modality, paths in example.get("media_paths", {}).items():
            media.setdefault(modality, []).extend(paths)
    if media:
        merged["media_paths"] = media
    return merged


def balanced_rows(examples: list[dict], per_row: int) -> list[list[dict]]:
    """Up to `per_row` examples per row, the longest placed first, each in the row with the
    fewest tokens so far: rows pad to the longest, and one long sample (a replay answer)
    would otherwise pad every other row to its length. Rows keep the draw's order inside."""
    count = -(-len(examples) // per_row)
    rows, lengths = [[] for _ in range(count)], [0] * count
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for index in by_length:
        row = min((r for r in range(count) if len(rows[r]) < per_row), key=lengths.__getitem__)
        rows[row].append(index)
        lengths[row] += len(examples[index]["input_ids"])
    return [[examples[i] for i in sorted(row)] for row in rows]
