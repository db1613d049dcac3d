"""BLEU-4 and CIDEr-D with the COCO caption evaluation code (pycocoevalcap), the code
behind published captioning scores; only its Java tokenizer is replaced by `tokenize`."""

from __future__ import annotations

import re
import unicodedata
import warnings

# CIDEr-D weighs each n-gram by log(images / images whose references hold it), counted over
# the evaluated set: with one image every weight is 0 (an exact match scores 0), and with
# a few, every word they share weighs nothing. Our floor; COCO's test set has 5000 images.
MIN_CIDER_IMAGES = 10
# Scripts written without spaces between words: Han ideographs (with extension A, the
# compatibility block and the supplementary planes), hiragana and katakana. Each
# character is one token, as sacrebleu's `zh` tokenizer does for BLEU on Chinese.
CJK = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f])")


def tokenize(text: str) -> str:
    """Lower case, punctuation dropped, words joined by single spaces (what COCO's PTB
    tokenizer leaves for these metrics, without needing Java). Letters of any script are
    kept ("Café" -> "café", after NFKC normalisation, so a decomposed "e" + accent is one
    letter); Chinese and Japanese characters are one token each ("红色的圆" -> "红 色 的 圆")."""
    text = CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).replace("\u2019", "'").lower())
    # Letters, digits and combining marks (the vowel signs of Devanagari, say) make words;
    # everything else separates them, and an apostrophe only joins two parts of a word.
    kept = "".join(c if c == "'" or unicodedata.category(c)[0] in "LNM" else " " for c in text)
    return " ".join(word for part in kept.split() if (word := part.strip("'")))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015; COCO scale:
    x10, as papers report it), and the per-caption CIDEr-D under `per_item`; one prediction
    and a non-empty list of references per image. Warns (UserWarning) under
    MIN_CIDER_IMAGES images, where CIDEr-D's document frequencies make it meaningless."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) < MIN_CIDER_IMAGES:
        warnings.warn(f"CIDEr-D over {len(predictions)} images weighs n-grams by their rarity among "
                      f"just those images; it needs at least {MIN_CIDER_IMAGES} to mean anything",
                      stacklevel=2)
    hypotheses = {i: [tokenize(p)] for i, p in enumerate(predictions)}
    truths = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truths, hypotheses, verbose=0)
    cider, per_item = Cider().compute_score(truths, hypotheses)
    return {"bleu4": float(bleu[3]), "cider_d": float(cider), "per_item": [float(s) for s in per_item]}
