"""`objective: autoencoder` (objectives/autoencoder.py) and the `reconstruction` eval task
(eval/reconstruction.py), issue 17 §1: a few steps lower the reconstruction loss, a stage
without a tokenizer is refused in one line, the task measures PSNR and codebook use and
draws its picture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

from polymodal.config import ModelConfig, RecipeConfig, StageConfig, from_dict
from polymodal.errors import ConfigError, UserError
from polymodal.eval.reconstruction import code_statistics, psnr
from polymodal.eval.run import evaluate
from polymodal.eval.tasks import TaskOptions, get_task
from polymodal.model import MultimodalLM
from polymodal.objectives.autoencoder import Autoencoding
from polymodal.train.run import train

TINY = {"image_size": 16, "downsample": 4, "levels": [5, 5, 5], "channels": [8, 8]}
TOKENS_MODEL = {"llm": {"source": "tiny:llama"}, "encoder": {"kind": "image-tokens", "dim": 16, **TINY},
                "connector": {"kind": "mlp"}}
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "yellow": (255, 255, 0)}


def shapes_folder(folder, count: int = 12):
    """A folder in easy-VQA's layout: `count` 32x32 images of one coloured circle or square on
    white, with a shape and a colour question each (what captions are read from)."""
    (folder / "images").mkdir(parents=True)
    questions = []
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = "circle" if index % 2 else "rectangle"
        image = Image.new("RGB", (32, 32), "white")
        box = (4 + index % 5, 6, 22 + index % 5, 24)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / "images" / f"{index}.png")
        questions += [["What shape is in the image?", shape, str(index)],
                      ["What color is the shape?", colour, str(index)]]
    (folder / "questions.json").write_text(json.dumps(questions))
    return folder


def stage(**options) -> dict:
    return {"name": "tokenizer", "objective": "autoencoder", "train": ["encoder.image"], "lr": {"encoder.image": 1e-2},
            "batch_size": 6, "log_every": 1, **options}


def test_a_few_steps_lower_the_reconstruction_loss(tmp_path):
    folder = shapes_folder(tmp_path / "shapes")
    data = [{"format": "easy-vqa-captions", "path": str(folder)}]
    recipe = from_dict(RecipeConfig, {"name": "tokenizer", "model": TOKENS_MODEL,
                                      "stages": [stage(steps=12, data=data)]})
    summary = train(recipe, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["stages"]["tokenizer"]["images"] == 12 * 6
    assert losses[-1] < 0.7 * losses[0]  # measured: 0.25 -> 0.10 in 12 steps


def test_a_stage_without_a_tokenizer_is_refused_in_one_line():
    plain = MultimodalLM(from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}}))
    config = from_dict(StageConfig, stage(data=[{"format": "easy-vqa-captions"}]))
    with pytest.raises(UserError, match="objective autoencoder trains an image tokenizer; this model has none") as error:
        Autoencoding(config, plain)
    assert "\n" not in str(error.value)
    tokens = MultimodalLM(from_dict(ModelConfig, TOKENS_MODEL))
    other = from_dict(StageConfig, stage(train=["connector"], lr={"connector": 1e-3}, data=[{"format": "easy-vqa"}]))
    with pytest.raises(UserError, match=r"add encoder\.image to the stage's train"):
        Autoencoding(other, tokens)
    assert Autoencoding(from_dict(StageConfig, stage(train=["encoder"], lr={"encoder": 1e-3},
                                                     data=[{"format": "easy-vqa"}])), tokens).part == "encoder.image"
    with pytest.raises(ConfigError, match="share_prefix: only for objective lm"):
        from_dict(StageConfig, stage(share_prefix=4, data=[{"format": "easy-vqa"}]))
    with pytest.raises(ConfigError, match="data: format replay is for objective lm"):
        from_dict(StageConfig, stage(data=[{"format": "replay"}]))


def test_the_reconstruction_task_measures_and_draws(tmp_path):
    folder = shapes_folder(tmp_path / "shapes", count=20)
    torch.manual_seed(0)
    model = MultimodalLM(from_dict(ModelConfig, TOKENS_MODEL)).eval()
    task = get_task("reconstruction")
    results, rows = evaluate(model, task, TaskOptions(data=str(folder), limit=19), batch_size=9,
                             out=tmp_path / "eval")
    assert (results["task"], results["images"], results["n"], results["tokens_per_image"]) == ("reconstruction", 19, 19, 16)
    assert results["codebook_size"] == 125 and 0 < results["codebook_usage"] <= 1
    assert 1 <= results["perplexity"] <= results["codes_used"] + 1e-9
    assert math.isclose(results["psnr"], sum(row["psnr"] for row in rows) / 19, rel_tol=1e-6)
    assert [len(images) for images in task.pictured] == [16, 16]  # the first 16, over batches of 9
    assert results["psnr_min"] <= results["psnr"] and {row["reference"] for row in rows} >= {"a red rectangle"}
    for name in ("results.json", "predictions.jsonl", "report.md", "reconstruction.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert Image.open(tmp_path / "eval" / "reconstruction.png").size[0] > 400  # 16 images, 8 a row
    with pytest.raises(UserError, match="task reconstruction needs a model with an image tokenizer"):
        evaluate(MultimodalLM(from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}})), "reconstruction",
                 TaskOptions(data=str(folder)))


def test_psnr_and_code_statistics():
    pixels = torch.zeros(2, 3, 4, 4)
    noisy = pixels.clone()
    noisy[0] += 0.1  # MSE 0.01: 20 dB
    noisy[1] += 0.01  # 40 dB
    assert torch.allclose(psnr(noisy, pixels), torch.tensor([20.0, 40.0]), atol=1e-4)
    uniform = code_statistics(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0]))
    assert uniform["codebook_usage"] == 0.5 and uniform["codes_used"] == 4 and math.isclose(uniform["perplexity"], 4)
    assert math.isclose(code_statistics(torch.tensor([9, 0, 0]))["perplexity"], 1)


@pytest.mark.parametrize("flag, value", [("--cfg", "5"), ("--images-per-prompt", "3"), ("--top-k", "4"),
                                         ("--temperature", "0.5")])
def test_drawing_options_given_to_a_task_that_does_not_draw_are_refused(capsys, tmp_path, flag, value):
    from polymodal.cli.main import main

    # refused before the model loads: the model does not exist
    code = main(["eval", str(tmp_path / "no_model"), "--task", "reconstruction", flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last == (f"polymodal: error: {flag}: only a task that draws (text-to-image) takes it; "
                                  "task reconstruction does not")
