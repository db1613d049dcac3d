"""Image blocks in generation: which tokens a row may take while it writes an image.

A model that draws (`model.image_codes`, image_generation/codes.py) writes an image as
`<begin_of_image>`, exactly K codes, `<end_of_image>`. The sampler cannot leave a block
early: inside one only codes are allowed (no end-of-turn, no text), after the K-th code only
`<end_of_image>`; outside one, codes and `<end_of_image>` are never allowed, and
`<begin_of_image>` only while K + 1 tokens of the budget are left, so a block always ends.

Classifier-free guidance (Ho & Salimans 2022, as Janus and LlamaGen apply it to image
tokens): each conditional row has an unconditional twin, the same conversation with the
user's words removed; a code's logits are u + s (c - u) for guidance scale s, and both rows
take the sampled code. At s = 1 this is the conditional row's own logits.
"""

from __future__ import annotations

import torch

TEXT = -1  # a row's `left` outside an image block
# The most images one command draws per prompt (generate --n, eval --images-per-prompt): all
# are held as float pixels until written or judged (1000 x 64 x 64 x 3 x 4 bytes: 49 MB a
# prompt; eval's 24 prompts at the cap: 1.2 GB).
MAX_IMAGES_PER_PROMPT = 1000


def constrain(logits: torch.Tensor, codes, left: list[int], budget: int) -> torch.Tensor:
    """logits [B, V'] (float, already masked for text) -> the same with -inf where a row may
    not go. `left` [B]: each row's codes still to write (TEXT outside a block, 0 when the
    block's codes are all written); `budget`: new tokens this generation may still take."""
    for row, remaining in enumerate(left):
        if remaining == TEXT:
            logits[row, codes.end_id :] = float("-inf")  # no end, no codes
            if budget < codes.num_codes + 2:  # a block begun now could not end (and then stop)
                logits[row, codes.begin_id] = float("-inf")
        elif remaining > 0:
            logits[row, : codes.first_code_id] = float("-inf")
        else:  # the K-th code is written: only the end
            logits[row] = float("-inf")
            logits[row, codes.end_id] = 0.0
    return logits


def next_left(codes, remaining: int, token: int) -> int:
    """A row's codes still to write after it takes `token`."""
    if token == codes.begin_id:
        return codes.num_codes
    if remaining > 0:
        return remaining - 1
    return TEXT if remaining == 0 or token == codes.end_id else remaining


def guided(logits: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: conditional logits [B, C] and their twins' [B, C] -> u + s (c - u)
    (LlamaGen's form; the same distribution as in log-probabilities, as each row's
    normalisers only shift it)."""
    if scale == 1.0:
        return logits
    return unconditional + scale * (logits - unconditional)


def unconditional_prompt(prompt: dict) -> dict:
    """The prompt without the user's words: every user turn's text emptied (its media kept
    out too); the system prompt stays. What a drawing format trains in place of a caption."""
    messages = [{**message, "content": ""} if message["role"] == "user" else message
                for message in prompt["messages"]]
    return {"messages": messages}
