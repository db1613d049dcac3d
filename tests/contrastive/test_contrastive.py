"""Contrastive learning: the losses by hand, caption derivation, and a contrastive stage in a recipe."""

import json
import math

import pytest
import torch
from PIL import Image

from conftest import ddp_and_single_losses, interrupted_run
from polymodal.config import RecipeConfig, from_dict
from polymodal.contrastive.losses import clip_loss, siglip_loss
from polymodal.contrastive.model import DualEncoder
from polymodal.data.easy_vqa import caption_of as easy_vqa_caption
from polymodal.data.easy_vqa import image_attributes as easy_vqa_attributes
from polymodal.data.easy_vqa import read_easy_vqa_captions
from polymodal.model import MultimodalLM
from polymodal.objectives.contrastive import Contrastive
from polymodal.processing.images import load_image
from polymodal.train.loop import train_stage
from polymodal.train.mixture import Mixture, encode_dataset
from polymodal.train.run import train

IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # logits (scale 1): [[1, .6], [0, .8]]


def softmax_nll(logits_row, target):
    return -(logits_row[target] - math.log(sum(math.exp(v) for v in logits_row)))


def test_clip_loss_by_hand():
    logits = [[1.0, 0.6], [0.0, 0.8]]
    columns = [[1.0, 0.0], [0.6, 0.8]]
    expected = (softmax_nll(logits[0], 0) + softmax_nll(logits[1], 1)) / 2
    expected = (expected + (softmax_nll(columns[0], 0) + softmax_nll(columns[1], 1)) / 2) / 2
    assert clip_loss(IMAGE, TEXT, torch.tensor(0.0)).item() == pytest.approx(expected, abs=1e-6)
    # The temperature scales the logits: exp(log 2) doubles them.
    doubled = [[2 * v for v in row] for row in logits]
    twice = (softmax_nll(doubled[0], 0) + softmax_nll(doubled[1], 1)) / 2
    twice = (twice + (softmax_nll([2.0, 0.0], 0) + softmax_nll([1.2, 1.6], 1)) / 2) / 2
    assert clip_loss(IMAGE, TEXT, torch.tensor(math.log(2))).item() == pytest.approx(twice, abs=1e-6)


def test_clip_loss_spreads_the_target_over_equal_captions():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two images, both "a red circle"
    same = torch.ones(2, 2, dtype=torch.bool)
    # Identical logits: a one-hot target costs log 2, and so does the spread target (its entropy),
    # but only the one-hot target has a gradient asking to tell the two apart.
    logits = torch.zeros(2, 2, requires_grad=True)
    F = torch.nn.functional
    F.cross_entropy(logits, torch.eye(2)).backward()
    assert logits.grad.abs().sum() > 0
    assert clip_loss(image, text, torch.tensor(0.0), same).item() == pytest.approx(math.log(2))


def test_siglip_loss_by_hand():
    scale, bias = 0.5, -1.0  # logits = exp(0.5) * sim - 1
    sims = [[1.0, 0.6], [0.0, 0.8]]
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = math.exp(scale) * sims[i][j] + bias
            sign = 1 if i == j else -1
            total += math.log(1 + math.exp(-sign * z))  # -log sigmoid(sign * z)
    loss = siglip_loss(IMAGE, TEXT, torch.tensor(scale), torch.tensor(bias))
    assert loss.item() == pytest.approx(total / 2, abs=1e-6)


def test_easy_vqa_attributes_read_both_question_kinds():
    assert easy_vqa_attributes([("what color is the circle?", "red")]) == {"shape": "circle", "color": "red"}
    assert easy_vqa_attributes([("is there not a blue shape?", "no")]) == {"color": "blue"}
    assert easy_vqa_attributes([("is there not a blue shape?", "yes")]) == {}
    assert easy_vqa_attributes([("is no triangle present?", "no"),
                                ("what is the triangle shape?", "teal")]) == {"shape": "triangle", "color": "teal"}
    assert easy_vqa_caption({"shape": "circle", "color": "red"}) == "a red circle"
    assert easy_vqa_caption({"color": "gray"}) == "a gray shape"


def test_flipped_yes_no_asks_about_the_present_attribute():
    from polymodal.data.easy_vqa import flipped_yes_no

    pairs = [("what color is the circle?", "red"), ("is there a blue shape?", "no"),
             ("is there not a green shape?", "yes"), ("is there a red shape?", "yes"),
             ("does the image contain a triangle?", "no")]
    assert flipped_yes_no(pairs) == [("is there a red shape?", "yes"), ("is there not a red shape?", "no"),
                                      ("does the image contain a circle?", "yes")]


def test_easy_vqa_captions_from_a_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "0.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "images" / "1.png")
    (tmp_path / "questions.json").write_text(json.dumps([
        ["what shape is in the image?", "circle", 0], ["is there a red shape?", "yes", 0],
        ["is there a green shape?", "no", 1]]))  # image 1 reveals nothing: left out
    samples = read_easy_vqa_captions(folder=tmp_path)
    assert [(s.id, s.messages[-1]["content"]) for s in samples] == [("0", "a red circle")]


# ---------------------------------------------------------------- a contrastive stage

CAPTIONS = ["a red square", "green grass", "the deep blue sea", "yellow"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
MODEL = {"llm": {"source": "tiny:llama"},
         "encoder": {"kind": "cnn", "image_size": 32, "channels": [8, 16]},
         "connector": {"kind": "mlp"}}


def caption_file(folder):
    lines = []
    for index, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "text": CAPTIONS[index]}))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    return folder / "captions.jsonl"


def contrastive_stage(path, steps=100, **extra):
    return {"name": "vision", "objective": "contrastive",
            "contrastive": {"text": "tiny:bert", "pool": "max", **extra.pop("contrastive", {})},
            "train": ["encoder", "projection"], "lr": {"encoder": 1e-2, "projection": 1e-2},
            "steps": steps, "batch_size": 4, "log_every": 5,
            "data": [{"format": "captions", "path": str(path)}], **extra}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_stage_learns_to_match_images_and_captions(tmp_path, loss):
    config = from_dict(RecipeConfig, {"name": "c", "model": MODEL,
                                      "stages": [contrastive_stage(caption_file(tmp_path),
                                                                   contrastive={"loss": loss})]})
    stage = config.stages[0]
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config)
    objective = Contrastive(stage, model)  # a DualEncoder around the model's own encoder
    dual = objective.module
    assert dual.encoder is model.encoder
    text_before = {k: v.clone() for k, v in dual.text.state_dict().items()}
    mixture = Mixture([encode_dataset(objective, d, None) for d in stage.data], objective)
    rows = []
    train_stage(objective, mixture, rows.append)
    assert rows[-1]["loss"] < rows[0]["loss"]
    pixels = torch.stack([load_image(tmp_path / f"{i}.png", 32) for i in range(4)])
    with torch.no_grad():
        scores = dual.encode_images(pixels) @ dual.encode_texts(CAPTIONS).T  # [4 images, 4 texts]
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
    assert all(torch.equal(text_before[k], v) for k, v in dual.text.state_dict().items())  # locked (LiT)


def test_recipe_with_a_contrastive_stage_then_an_lm_stage_resumes_identically(tmp_path, monkeypatch):
    path = caption_file(tmp_path)
    config = from_dict(RecipeConfig, {"name": "two", "model": MODEL, "checkpoint": {"every": 2},
                                      "stages": [contrastive_stage(path, steps=4, log_every=1), {
        "name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "epochs": 2,
        "batch_size": 4, "log_every": 1, "data": [{"format": "captions", "path": str(path)}]}]})
    summary = train(config, tmp_path / "straight")
    assert summary["stages"]["align"]["samples"] == 2 * 4  # 2 epochs of 4 samples: 2 steps of 4
    assert summary["stages"]["vision"]["tokens"] == 0  # pairs, not tokens
    rows = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert "pairs_per_second" in rows[0] and "tokens_per_second" in rows[-1]

    # the 3rd forward: contrastive step 3, after the checkpoint at its step 2
    interrupted_run(monkeypatch, config, tmp_path / "resumed", at_call=3, module_class=DualEncoder)
    train(config, tmp_path / "resumed", resume=True)
    from safetensors.torch import load_file
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert any(k.startswith("encoders.image.") for k in straight)
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert differ == [], (differ, [float((straight[k] - resumed[k]).abs().max()) for k in differ])



def test_contrastive_stage_names_unknown_parts(tmp_path):
    from polymodal.errors import UserError

    stage = contrastive_stage(caption_file(tmp_path), steps=1)
    stage["train"], stage["lr"] = ["connector"], {"connector": 1e-3}
    config = from_dict(RecipeConfig, {"name": "c", "model": MODEL, "stages": [stage]})
    with pytest.raises(UserError, match="unknown trainable part 'connector' in a contrastive stage"):
        train(config, tmp_path / "run")


def test_system_prompt_goes_first_in_training_and_generation():
    from conftest import tiny_model

    model = tiny_model(llm={"system_prompt": "Be brief."})
    prompt = model.processor.encode([{"role": "user", "content": "hi"}])
    assert model.llm.tokenizer.decode(prompt["input_ids"]).startswith("<|im_start|>system\nBe brief.")
    own = model.llm.render([{"role": "system", "content": "Other."}, {"role": "user", "content": "hi"}], True)
    assert "Be brief." not in own


def test_two_process_ddp_contrastive_loss_uses_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes: each scores its rows against both processes' embeddings,
    so the loss curve equals one process's on the same global batch of 8 (a per-process
    loss over 4 rows would not)."""
    stage = contrastive_stage(caption_file(tmp_path), steps=4, log_every=1, batch_size=8)
    ddp, single = ddp_and_single_losses({"name": "ddp", "model": MODEL, "stages": [stage]}, tmp_path)
    assert len(ddp) == 4
    assert ddp == pytest.approx(single, rel=1e-4)
