"""What the export proofs of the formats share (test_llava.py, test_idefics3.py, test_gguf.py): the
tiny compositions built (LoRA given a real delta), exported and run by plain transformers in
one subprocess (plain_transformers.py), polymodal's side of the comparison, and the checks
that an export refuses in one line and leaves nothing behind when it fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from plain_transformers import run_plain

from conftest import tiny_model
from polymodal.cli.main import main
from polymodal.interop import export_model

QUESTION = "\nWhat shape is in the image?"
NEW_TOKENS = 8


def with_lora_deltas(model):
    """peft starts B at zero: give every adapter a delta, so that merging changes the weights
    and a test of the merge can fail. The model, changed in place."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def build(encoder: dict, connector: dict, llm: dict):
    """A tiny model of these parts, its LoRA adapters (if any) given deltas."""
    model = tiny_model(encoder, connector, llm)
    return with_lora_deltas(model) if llm.get("lora") else model


def messages(image=None) -> list[dict]:
    """One user turn: the image (a path, or none for the plain side's processor) and QUESTION."""
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


def export_all(compositions: dict, export_format: str, work) -> dict:
    """Each composition (name -> (encoder, connector, llm)) built, exported in `export_format`
    under `work`, and run by plain transformers in one subprocess: name -> (model, export
    directory, plain-transformers result, image). The image needs resizing (70x45 to the
    encoders' 32x32)."""
    image = work / "image.png"
    Image.fromarray((np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)).save(image)
    models, runs = {}, []
    for name, parts in compositions.items():
        models[name] = build(*parts)
        export_model(models[name], export_format, work / name)
        runs.append({"name": name, "directory": str(work / name), "image": str(image),
                     "messages": messages(), "max_new_tokens": NEW_TOKENS})
    results = run_plain("image_text_to_text", runs, work / "plain")
    return {name: (models[name], work / name, results[name], image) for name in compositions}


def polymodal_side(model, image):
    """(prompt ids, logits [T, V], greedy answer ids) as polymodal computes them."""
    from polymodal.engine.generate import Engine
    from polymodal.engine.sampling import SamplingParams

    prompt = model.processor.encode(messages(str(image)))
    with torch.no_grad():
        embeds = model.embed(torch.tensor([prompt["input_ids"]]), prompt["media"])
        hidden = model.llm.decoder(inputs_embeds=embeds).last_hidden_state
        logits = model.llm.lm_head(hidden)[0]
    [answer] = Engine(model).generate([{"messages": messages(str(image))}],
                                      SamplingParams(max_new_tokens=NEW_TOKENS))
    return prompt["input_ids"], logits, answer.token_ids


def recipe(tmp_path, encoder: dict, connector: dict, **model) -> str:
    """A recipe file of a tiny Llama with this image encoder and connector."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"llm": {"source": "tiny:llama"}, "encoder": encoder,
                                                            "connector": connector, **model}}))
    return str(path)


def refused_export(tmp_path, capsys, encoder: dict, connector: dict, export_format: str) -> str:
    """`polymodal export` of a recipe it cannot write: exit 2, nothing left behind; its last
    stderr line (the refusal) is returned."""
    out = tmp_path / "out"
    code = main(["export", recipe(tmp_path, encoder, connector), "--format", export_format, str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    return error[-1]


def failed_export_leaves_nothing(model, export_format: str, writer_module, tmp_path, monkeypatch) -> None:
    """A disk that fails after the tokenizer files are written (the format's
    `write_safetensors` raises): the export raises, and `tmp_path` stays empty."""
    def disk_fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "write_safetensors", disk_fails)
    with pytest.raises(OSError):
        export_model(model, export_format, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
