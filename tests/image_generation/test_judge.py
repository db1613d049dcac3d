"""The judge of drawn images (eval/judge.py): trains a few steps on a handful of real easy-VQA
images, classifies [N] shapes and colours, is cached by its data and settings (atomically),
read back without training. The full judge is trained by benchmarks/judge.py, not here."""

import json

import pytest
import torch

from conftest import needs_package
from polymodal.data.easy_vqa import COLORS, SHAPES, easy_vqa_folder
from polymodal.eval import judge as judge_module
from polymodal.eval.judge import (
    IGNORE,
    NO_COLOR,
    NO_SHAPE,
    JudgeNetwork,
    JudgeSettings,
    labelled_images,
    load_judge,
    negatives,
    train_judge,
)

SMALL = JudgeSettings(width=4, epochs=1, batch_size=16, limit=48)


def test_network_shapes():
    shapes, colors = JudgeNetwork(width=4)(torch.rand(5, 3, 64, 64))
    assert shapes.shape == (5, len(SHAPES) + 1) and colors.shape == (5, len(COLORS) + 1)  # and "none"


@needs_package("easy_vqa")
def test_labels_come_from_the_questions():
    pixels, shapes, colors = labelled_images(easy_vqa_folder("test"), limit=40)
    assert pixels.shape == (40, 3, 64, 64) and pixels.dtype == torch.uint8
    assert ((shapes >= 0) | (shapes == IGNORE)).all() and (shapes != IGNORE).sum() > 30
    assert ((colors >= 0) & (colors < len(COLORS)) | (colors == IGNORE)).all()


@needs_package("easy_vqa")
def test_trains_a_few_steps_and_classifies():
    with torch.no_grad():  # as an eval that asks for the judge on first use: it trains all the same
        judge = train_judge(easy_vqa_folder("train"), easy_vqa_folder("test"), SMALL, progress=False)
    shapes, colors = judge.classify(torch.rand(7, 3, 64, 64))
    assert shapes.shape == (7,) and colors.shape == (7,) and shapes.dtype == torch.long
    assert shapes.max() <= NO_SHAPE and colors.max() <= NO_COLOR
    smaller, _ = judge.classify(torch.rand(2, 3, 16, 16))  # another size: resized to 64 x 64
    assert smaller.shape == (2,)
    assert set(judge.accuracy) == {"shape", "color"} and all(0 <= v <= 1 for v in judge.accuracy.values())
    assert judge.info["train_images"] == 48 and judge.info["test_images"]["shape"] > 40


@needs_package("easy_vqa")
def test_cached_by_data_and_settings(tmp_path, monkeypatch):
    first = load_judge(settings=SMALL, cache=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    info = json.loads((tmp_path / files[0]).read_text())
    assert info["accuracy"] == first.accuracy and len(info["fingerprint"]) == 64

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(judge_module, "train_judge", no_training)
    again = load_judge(settings=SMALL, cache=tmp_path, progress=False)
    pixels = torch.rand(4, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(first.classify(pixels), again.classify(pixels)))
    assert again.accuracy == first.accuracy
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another judge
        load_judge(settings=JudgeSettings(width=4, epochs=2, batch_size=16, limit=48), cache=tmp_path)


def test_negatives_are_labelled_none():
    images, shapes, colors = negatives(30, torch.Generator().manual_seed(0))
    assert images.shape == (30, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert (shapes == NO_SHAPE).all() and set(colors.tolist()) == {NO_COLOR, IGNORE}  # a filled frame: any colour


def test_cache_folder_follows_polymodal_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    assert judge_module.judge_cache() == tmp_path / "judge"
    monkeypatch.setenv("POLYMODAL_CACHE", "off")
    assert judge_module.judge_cache() is None
