"""Image codes as LLM tokens: ids past the text vocabulary, with their own embedding and head.

An image tokenizer turns a picture into K discrete codes (encoders/image_tokenizer.py). The
LLM reads and writes them as tokens (Chameleon's early fusion, Chameleon Team 2024), between
`<begin_of_image>` and `<end_of_image>` (Janus's names, Wu et al. 2024). Their ids follow the
LLM's V embedding rows: `<begin_of_image>` = V, `<end_of_image>` = V + 1, code c = V + 2 + c.
They are not in the text tokenizer: text never spells them, and only the engine emits them.

Their rows live in modules of their own (Janus's separate generation embedding and head, not
new rows of the text matrices): the frozen LLM's tied embedding matrix stays as it is and
untouched by the optimizer, the new rows train as part `image_output`, and training computes
a code's logits over the C codes alone ([D, C] instead of [D, V + C]: SmolLM2's V = 49,216,
so a 64-code image costs 1/49 of the head's work). `CodeEmbedding` and `CodeHead` subclass
the layers they replace and share their weight tensors, so the LLM's keys and weight tying
stay as they were (the new rows are the child `codes`, saved as `...embed_tokens.codes.*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ImageCodes:
    """Where image codes sit among the LLM's token ids (one image = `num_codes` codes).

    text_vocab: V, the LLM's embedding rows before the codes (text and placeholders);
    codebook_size: C; num_codes: K, codes per image (the tokenizer's grid, raster order).
    """

    text_vocab: int
    codebook_size: int
    num_codes: int

    @property
    def begin_id(self) -> int:
        return self.text_vocab

    @property
    def end_id(self) -> int:
        return self.text_vocab + 1

    @property
    def first_code_id(self) -> int:
        return self.text_vocab + 2

    @property
    def vocab_size(self) -> int:
        """All ids the extended LLM scores: text, the two markers, the codes."""
        return self.text_vocab + 2 + self.codebook_size

    def to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., K] in [0, C) -> token ids [..., K]."""
        return codes + self.first_code_id

    def to_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [..., K] of codes -> codes [..., K] in [0, C)."""
        return token_ids - self.first_code_id

    def is_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        """bool [...]: which ids are image codes (not the markers, not text)."""
        return token_ids >= self.first_code_id

    def block(self, codes: list[int]) -> list[int]:
        """One image's codes -> its token ids with the markers: [begin, K codes, end]."""
        return [self.begin_id, *(code + self.first_code_id for code in codes), self.end_id]


class CodeEmbedding(nn.Embedding):
    """The LLM's input embedding (its weight shared, not copied) that also embeds the image
    tokens: ids [...] -> [..., D]; ids < V read the text rows, ids >= V the rows of `codes`
    ([2 + C, D]: the markers, then the codes)."""

    def __init__(self, base: nn.Embedding, extra_rows: int):
        super().__init__(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx, device="meta")
        self.weight = base.weight  # the same Parameter: the LM head's tie stays
        self.codes = nn.Embedding(extra_rows, base.embedding_dim, device=base.weight.device,
                                  dtype=base.weight.dtype)
        with torch.no_grad():  # new rows at the text rows' scale, so no token starts out huge
            std = base.weight[: min(base.num_embeddings, 4096)].float().std()
            self.codes.weight.normal_(0.0, float(std))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        text_vocab = self.num_embeddings
        image = input_ids >= text_vocab
        out = F.embedding(input_ids.masked_fill(image, 0), self.weight, self.padding_idx)
        if not bool(image.any()):
            return out
        rows = self.codes(input_ids[image] - text_vocab).to(out.dtype)  # [N_image, D]
        return out.masked_scatter(image.unsqueeze(-1).expand_as(out), rows)


class CodeHead(nn.Linear):
    """The LLM's LM head (its weight shared) with columns for the image tokens: hidden [..., D]
    -> logits [..., V + 2 + C] (text, `<begin_of_image>`, `<end_of_image>`, codes). Starts at
    zero, so a fresh model's text logits are the LLM's and it never begins an image."""

    def __init__(self, base: nn.Linear, extra_rows: int):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.codes = nn.Linear(base.in_features, extra_rows, bias=False, device=base.weight.device,
                               dtype=base.weight.dtype)
        nn.init.zeros_(self.codes.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        text = F.linear(hidden, self.weight, self.bias)
        return torch.cat([text, self.codes(hidden.to(self.codes.weight.dtype)).to(text.dtype)], dim=-1)

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, C] over the codes alone (a position inside an image
        block, where only codes can follow): what training scores."""
        return F.linear(hidden.to(self.codes.weight.dtype), self.codes.weight[2:])


def attach_image_codes(causal_lm: nn.Module, codebook_size: int, num_codes: int) -> ImageCodes:
    """Give a transformers causal LM image-code tokens: its input embedding and LM head are
    replaced by `CodeEmbedding` and `CodeHead` around the same weights (after LoRA and any
    placeholder rows). Returns where the ids sit."""
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    codes = ImageCodes(embedding.num_embeddings, codebook_size, num_codes)
    if head.out_features != codes.text_vocab:  # an LLM whose head and rows differ: the ids would clash
        raise RuntimeError(f"LM head has {head.out_features} outputs, the embedding {codes.text_vocab} rows")
    causal_lm.set_input_embeddings(CodeEmbedding(embedding, 2 + codebook_size))
    causal_lm.set_output_embeddings(CodeHead(head, 2 + codebook_size))
    return codes


def code_modules(causal_lm: nn.Module) -> list[nn.Module]:
    """The image tokens' trainable modules (embedding rows and head rows): part `image_output`."""
    return [causal_lm.get_input_embeddings().codes, causal_lm.get_output_embeddings().codes]
