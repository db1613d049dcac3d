"""A llava-hf or SmolVLM directory as a model source: export -> import -> polymodal gives the
same prompt ids, logits and greedy answers (tiny models, both formats); `polymodal chat DIR`
runs it; a recipe starts from an exported tiny llava directory with LoRA and trains a stage;
pickled weights are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import tiny_model
from polymodal.build import build_model, load_any
from polymodal.cli.main import main
from polymodal.config import load_recipe
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.interop import export_model
from polymodal.interop.imports import stock_format
from polymodal.train.run import train

COMPOSITIONS = {
    "llava": ({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "depth": 2}, {"lora": {"r": 4, "alpha": 8}}),
    "smolvlm": ({"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
                {"kind": "pixel_shuffle", "factor": 2, "depth": 1, "bias": False, "markers": True}, {}),
}
QUESTION = "\nWhat shape is this?"


def build(name: str):
    encoder, connector, llm = COMPOSITIONS[name]
    model = tiny_model(encoder, connector, llm)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: a real delta, so merging shows
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("import")
    Image.new("RGB", (40, 30), (200, 30, 90)).save(work / "image.png")
    models = {}
    for name in COMPOSITIONS:
        models[name] = build(name)
        export_model(models[name], "llava" if name == "llava" else "smolvlm", work / name)
    return work, models


def run(model, image):
    """(prompt ids, logits [T, V], greedy answer ids) of an image question."""
    messages = [{"role": "user", "content": f"<image>{QUESTION}"}]
    prompt = model.processor.encode(messages, [str(image)])
    with torch.no_grad():
        embeds = model.embed(torch.tensor([prompt["input_ids"]]), prompt["media"])
        logits = model.llm.lm_head(model.llm.decoder(inputs_embeds=embeds).last_hidden_state)[0]
    [answer] = Engine(model).generate([{"messages": messages, "images": [str(image)]}],
                                      SamplingParams(max_new_tokens=8))
    return prompt["input_ids"], logits, answer.token_ids


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_export_then_import_gives_polymodals_ids_logits_and_answer(exported, name):
    work, models = exported
    assert stock_format(work / name) == ("llava" if name == "llava" else "idefics3")
    imported = load_any(str(work / name))
    assert imported.config.llm.lora is None  # the adapters were merged into the export
    ids, logits, answer = run(models[name], work / "image.png")
    ids_again, logits_again, answer_again = run(imported, work / "image.png")
    assert ids_again == ids
    vocabulary = logits.shape[-1]  # smolvlm's export may add rows for its marker tokens
    assert (logits_again[:, :vocabulary] - logits).abs().max().item() <= 1e-5
    assert answer_again == answer and len(answer) > 0


def test_chat_command_answers_from_a_stock_directory(exported, capsys):
    work, models = exported
    code = main(["chat", str(work / "llava"), f"<image>{QUESTION}", "--image", str(work / "image.png"),
                 "--max-new-tokens", "8"])
    assert code == 0
    expected = Engine(models["llava"]).generate([{"messages": [{"role": "user", "content": f"<image>{QUESTION}"}],
                                                  "images": [str(work / "image.png")]}], SamplingParams(max_new_tokens=8))
    assert capsys.readouterr().out.strip() == expected[0].text.strip()


def test_a_recipe_starts_from_an_exported_llava_directory_with_lora(exported, tmp_path):
    work, models = exported
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    records = [{"id": "0", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    stage = {"name": "tune", "train": ["llm.lora"], "lr": {"llm.lora": 1e-2}, "steps": 3, "batch_size": 1,
             "log_every": 1, "data": [{"format": "llava", "path": str(tmp_path / "data.json")}]}
    (tmp_path / "tune.yaml").write_text(json.dumps({
        "name": "tune", "init_from": str(work / "llava"), "stages": [stage],
        "model": {"llm": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}}))
    recipe = load_recipe(tmp_path / "tune.yaml")
    assert recipe.model.encoders["image"].kind == "hf" and recipe.model.llm.lora.r == 4
    started = build_model(recipe)
    _, logits, _ = run(models["llava"], work / "image.png")
    assert (run(started, work / "image.png")[1] - logits).abs().max() <= 1e-5  # fresh LoRA: B = 0
    train(recipe, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    tuned = load_any(str(tmp_path / "run" / "model"))  # a polymodal model now, LoRA and all
    assert tuned.config.llm.lora.target_modules == ["q_proj", "v_proj"]
    assert tuned.llm.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().max() > 0


def test_pickled_weights_are_refused_in_one_line(exported, tmp_path):
    work, _ = exported
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text((work / "llava" / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError) as error:
        load_any(str(folder))
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message and "\n" not in message


def test_a_model_block_beside_a_polymodal_init_from_is_still_refused(exported, tmp_path):
    _, models = exported
    models["llava"].save_pretrained(tmp_path / "saved")
    (tmp_path / "r.yaml").write_text(json.dumps({"name": "r", "init_from": str(tmp_path / "saved"),
                                                 "model": {"llm": {"lora": {"r": 2}}}}))
    with pytest.raises(UserError, match="leave model out"):
        load_recipe(tmp_path / "r.yaml")
