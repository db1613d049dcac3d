"""Writes the saved models of format version 1 that tests/test_saved.py loads.

They pin the directory format as it was first released (config.json + model.safetensors +
tokenizer files, `model.encoder` / `model.connector` spelled singly): a change to the
format or to a model's weight names must keep them loading (fix old records in
polymodal.saved.upgrade_record). Regenerate only from a commit that writes format 1 (e.g.
4d48f4e), never to make a failing load pass:

    .venv/bin/python tests/data/saved-v1/make.py
"""

from pathlib import Path

import torch

from polymodal.build import build_model
from polymodal.config import ModelConfig, from_dict

HERE = Path(__file__).parent
MODELS = {
    "multimodal-lm": {"encoder": {"kind": "hf", "source": "tiny:clip"},
                      "connector": {"kind": "mlp", "depth": 2}, "llm": {"source": "tiny:llama"}},
    "dual-encoder": {"kind": "dual-encoder", "encoder": {"kind": "hf", "source": "tiny:clip"},
                     "contrastive": {"text": "tiny:bert", "dim": 16}},
}

if __name__ == "__main__":
    for name, data in MODELS.items():
        torch.manual_seed(0)
        build_model(from_dict(ModelConfig, data, "model")).save_pretrained(HERE / name)
