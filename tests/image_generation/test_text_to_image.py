"""The `text-to-image` eval task (eval/text_to_image.py): its metrics on stand-in engines whose
images are known (real easy-VQA images of the asked caption: shape and colour 100%, diversity
near the data's; blank images: only the judge's fixed guess right, diversity 0), its files,
its errors, and one run through the real engine on a tiny drawing model."""

import contextlib
import json
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import needs_package, tiny_model
from polymodal.config import ModelConfig, from_dict
from polymodal.data.easy_vqa import (
    COLORS,
    SHAPES,
    attributes_by_image,
    easy_vqa_folder,
    full_captions,
)
from polymodal.engine.generate import Engine
from polymodal.errors import UserError
from polymodal.eval import text_to_image
from polymodal.eval.judge import read_pixels
from polymodal.eval.run import evaluate
from polymodal.eval.tasks import TaskOptions, get_task
from polymodal.model import MultimodalLM

DRAWS = SimpleNamespace(image_tokenizer=object())  # what the task checks: the model has an image output


def caption_of_prompt(prompt: dict) -> str:
    return prompt["messages"][-1]["content"].removeprefix("Draw ").removesuffix(".")


class RealImagesEngine:
    """Stand-in for Engine: n real easy-VQA test images of each prompt's caption, seeded."""

    def __init__(self, model):
        self.references = full_captions(easy_vqa_folder("test"))

    def lora_merged(self):
        return contextlib.nullcontext()

    generate_images_in_batches = Engine.generate_images_in_batches  # the real batching, over these images

    def generate_images(self, prompts, params, n=1):
        chosen = [path for prompt in prompts
                  for path in random.Random(params.seed).sample(self.references[caption_of_prompt(prompt)], n)]
        return read_pixels(chosen).float() / 255


class BlankEngine(RealImagesEngine):
    def generate_images(self, prompts, params, n=1):
        return torch.ones(len(prompts) * n, 3, 64, 64)


class LookupJudge:
    """Stand-in for the trained judge: the true labels of easy-VQA's test images (found by
    their pixels); (circle, red) for any other image."""

    def __init__(self):
        self.accuracy = {"shape": 1.0, "color": 1.0}
        known = [(path, found) for path, found in attributes_by_image(easy_vqa_folder("test")) if len(found) == 2]
        pixels = read_pixels([path for path, _ in known])
        self.labels = {bytes(p.numpy()): (SHAPES.index(f["shape"]), COLORS.index(f["color"]))
                       for p, (_, f) in zip(pixels, known)}

    def classify(self, pixels):
        quantised = (pixels * 255).round().to(torch.uint8)
        labels = [self.labels.get(bytes(p.numpy()), (0, 0)) for p in quantised]
        return torch.tensor([s for s, _ in labels]), torch.tensor([c for _, c in labels])


@pytest.fixture
def stand_ins(monkeypatch):
    judge = LookupJudge()
    monkeypatch.setattr(text_to_image, "load_judge", lambda: judge)

    def use(engine):
        monkeypatch.setattr(text_to_image, "Engine", engine)

    return use


@needs_package("easy_vqa")
def test_real_images_of_the_caption_score_full_marks(stand_ins, tmp_path):
    stand_ins(RealImagesEngine)
    options = TaskOptions(images_per_prompt=4, seed=3)
    results, rows = evaluate(DRAWS, "text-to-image", options, batch_size=10, out=tmp_path)
    assert results["both"] == results["shape"] == results["color"] == 1.0
    assert results["images"] == len(rows) == 96 and results["prompts"] == 24
    assert all(group == {"shape": 1.0, "color": 1.0, "both": 1.0, "diversity": group["diversity"]}
               for group in [*results["by_shape"].values(), *results["by_color"].values()])
    assert len(results["by_shape"]) == 3 and len(results["by_color"]) == 8 and len(results["by_prompt"]) == 24
    assert 0.7 < results["diversity"] < 1.3  # real images of a caption vary as the data do
    assert results["distinct"] == 1.0 and results["judge_accuracy"] == {"shape": 1.0, "color": 1.0}
    assert rows[0] == {"id": "red-circle:0", "prompt": "Draw a red circle.", "sample": 0, "shape": "circle",
                       "color": "red", "prediction": "a red circle", "reference": "a red circle",
                       "shape_correct": True, "color_correct": True, "correct": True}
    assert json.loads((tmp_path / "results.json").read_text())["both"] == 1.0
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 96
    assert (tmp_path / "grid.png").stat().st_size > 0 and "by prompt" in (tmp_path / "report.md").read_text()


@needs_package("easy_vqa")
def test_blank_images_score_only_the_judges_fixed_guess(stand_ins):
    stand_ins(BlankEngine)
    results, rows = evaluate(DRAWS, "text-to-image", TaskOptions(images_per_prompt=3))
    assert results["shape"] == pytest.approx(1 / 3) and results["color"] == pytest.approx(1 / 8)
    assert results["both"] == pytest.approx(1 / 24)  # the judge says "a red circle" to every blank image
    assert results["by_shape"]["circle"]["shape"] == 1.0 and results["by_shape"]["triangle"]["shape"] == 0.0
    assert results["by_color"]["red"]["color"] == 1.0 and results["by_color"]["teal"]["both"] == 0.0
    assert results["diversity"] == 0.0 and results["distinct"] == pytest.approx(1 / 3)  # copies of one image
    assert sum(row["correct"] for row in rows) == 3  # "Draw a red circle.", three times


@needs_package("easy_vqa")
def test_limit_picks_a_seeded_sample_of_prompts_in_order():
    task = get_task("text-to-image")
    items = task.items(TaskOptions(limit=5, seed=1))
    assert len(items) == 5 and items == task.items(TaskOptions(limit=5, seed=1))
    order = [item.question for item in task.items(TaskOptions())]
    assert [item.question for item in items] == sorted((i.question for i in items), key=order.index)


def test_a_model_that_does_not_draw_is_refused_in_one_line(stand_ins):
    stand_ins(BlankEngine)
    task = get_task("text-to-image")
    with pytest.raises(UserError, match="needs a model that draws images"):
        task.run(tiny_model(), TaskOptions(), 8)
    with pytest.raises(UserError, match="--shots"):
        task.run(DRAWS, TaskOptions(shots=1), 8)
    for count in (0, 1001):  # 1001: more than a command holds as pixels (MAX_IMAGES_PER_PROMPT)
        with pytest.raises(UserError, match=r"--images-per-prompt must be in \[1, 1000\]"):
            task.run(DRAWS, TaskOptions(images_per_prompt=count), 8)


@needs_package("easy_vqa")
def test_through_the_real_engine_on_a_tiny_drawing_model(monkeypatch):
    """The lead's Engine.generate_images on tiny:llama with a tiny FSQ tokenizer (16 x 16
    images; the judge's stand-in, since a trained judge takes half a minute)."""
    judge = LookupJudge()
    monkeypatch.setattr(text_to_image, "load_judge", lambda: judge)
    tokenizer = {"image_size": 16, "downsample": 4, "levels": [4, 4], "channels": [8, 8]}
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "image_output": {"tokenizer": tokenizer}})
    torch.manual_seed(0)
    model = MultimodalLM(config).eval()
    with torch.no_grad():  # fresh, the code head is zero: noise makes it draw varied codes
        model.llm.model.get_output_embeddings().codes.weight.normal_(0.0, 0.05)
    task = get_task("text-to-image")
    options = TaskOptions(limit=3, images_per_prompt=2, guidance_scale=2.0, seed=5)
    results, rows = task.run(model, options, batch_size=2)
    first = task.drawings.pixels
    assert first.shape == (6, 3, 16, 16) and len(rows) == 6 and results["images"] == 6
    assert 0 <= results["both"] <= 1 and results["diversity"] is not None
    task.run(model, options, batch_size=6)  # seeded: the same images whatever the batch size
    assert torch.equal(task.drawings.pixels, first)
