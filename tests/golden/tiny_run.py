"""The tiny recipe's golden run: the first losses of each stage and the greedy answers after.

`tests/test_golden.py` compares a fresh run with `tiny_run.json`. A change that alters the
numbers on purpose (a new initialisation, a new loss) regenerates the file and says why in
its commit:

    .venv/bin/python tests/golden/tiny_run.py --write

Everything goes through the command line (`polymodal train`, `polymodal chat`), so the
file pins behaviour, not the names of the code inside.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import yaml
from PIL import Image

HERE = Path(__file__).parent
GOLDEN = HERE / "tiny_run.json"
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ghost"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0)]
PROMPTS = [("0.png", "<image>\nWhat is this?"), ("5.png", "<image>\nWhat is this?"),
           (None, "What is the capital of France?")]


def write_data(folder: Path) -> Path:
    """Eight solid-colour 32x32 images, each with its own one-word answer, as LLaVA JSON."""
    records = []
    for index, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": WORDS[index]}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def recipe(data: Path) -> dict:
    """A LLaVA-shaped model of tiny parts, aligned (connector) then tuned (encoder, connector, LoRA)
    until it has learnt most of the eight answers."""
    stage = {"batch_size": 8, "log_every": 1, "data": [{"format": "llava", "path": str(data)}]}
    return {"name": "golden", "model": {
        "llm": {"source": "tiny:llama", "lora": {"r": 4, "alpha": 8}},
        "encoder": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "connector": {"kind": "mlp", "depth": 2}},
        "stages": [{"name": "align", "train": ["connector"], "lr": {"connector": 3e-3}, "steps": 4, **stage},
                   {"name": "tune", "train": ["encoder", "connector", "llm.lora"], "steps": 40,
                    "lr": {"encoder": 3e-3, "connector": 3e-3, "llm.lora": 1e-2}, **stage}]}


def run() -> dict:
    """Train the tiny recipe in a temporary folder; its losses and greedy answers."""
    from polymodal.cli.main import main

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        recipe_file = folder / "golden.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe(write_data(folder))))
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", str(recipe_file), "--out", str(folder / "run")]) == 0
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = {name: [row["loss"] for row in rows if row["stage"] == name and "loss" in row]
                  for name in ("align", "tune")}
        answers = []
        for image, prompt in PROMPTS:
            extra = ["--image", str(folder / image)] if image else []
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                assert main(["chat", str(folder / "run" / "model"), "--max-new-tokens", "8", *extra, prompt]) == 0
            answers.append(out.getvalue())
    return {"losses": losses, "answers": answers}


if __name__ == "__main__":
    result = run()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(result, indent=2))
