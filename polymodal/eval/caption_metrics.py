"""BLEU-4 and CIDEr-D with the COCO caption evaluation code (pycocoevalcap), the code
behind published captioning scores; only its Java tokenizer is replaced by `tokenize`."""

from __future__ import annotations

import re


def tokenize(text: str) -> str:
    """Lower case, punctuation dropped, words joined by single spaces (what COCO's PTB
    tokenizer leaves for these metrics, without needing Java)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (COCO scale: CIDEr-D x10, as papers report it), and the
    per-caption CIDEr-D under `per_item`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    hypotheses = {i: [tokenize(p)] for i, p in enumerate(predictions)}
    truths = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truths, hypotheses, verbose=0)
    cider, per_item = Cider().compute_score(truths, hypotheses)
    return {"bleu4": float(bleu[3]), "cider_d": float(cider), "per_item": [float(s) for s in per_item]}
