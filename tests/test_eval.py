"""easy-VQA evaluation: normalisation, per-type accuracy, outputs, and the command line."""

import json

import pytest
from PIL import Image

from conftest import RECIPES
from polymodal.engine.generate import Completion, Generator
from polymodal.eval.easy_vqa import evaluate_easy_vqa, question_type
from polymodal.eval.metrics import accuracy_by, confusion, normalize

QUESTIONS = [["what shape is this?", "circle", 0], ["what color is the shape?", "red", 0],
             ["is there a circle?", "yes", 0], ["what shape is this?", "triangle", 1],
             ["what color is the shape?", "blue", 1], ["is there a blue shape?", "yes", 1]]
# What the fake model answers, question by question: raw text before normalising.
ANSWERS = {("what shape is this?", 0): " Circle. ", ("what color is the shape?", 0): "RED",
           ("is there a circle?", 0): "no", ("what shape is this?", 1): "circle",
           ("what color is the shape?", 1): "blue\n", ("is there a blue shape?", 1): "Yes!"}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for image_id, colour in ((0, (200, 0, 0)), (1, (0, 0, 200))):  # told apart by colour
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / f"{image_id}.png")
    (tmp_path / "questions.json").write_text(json.dumps(QUESTIONS))
    (tmp_path / "answers.txt").write_text("circle\ntriangle\nred\nblue\nyes\nno\n")
    return tmp_path


@pytest.fixture
def scripted(monkeypatch):
    """Generator.generate answers from ANSWERS, so the metrics are known by hand."""
    def generate(self, prompts, params=None):
        out = []
        for prompt in prompts:
            question = prompt["messages"][0]["content"].removeprefix("<image>\n")
            image_id = int(prompt["images"][0][2].mean() > 0.5)  # pixels [3, S, S]: blue is image 1
            out.append(Completion(ANSWERS[question, image_id], [], "stop", 0))
        return out
    monkeypatch.setattr(Generator, "generate", generate)


def test_normalize_and_types():
    assert normalize("  The  Circle. ") == "the circle"
    assert normalize("Yes!") == "yes"
    assert [question_type(a) for a in ("yes", "no", "circle", "teal")] == ["yes/no", "yes/no", "shape", "colour"]


def test_accuracy_by_type_and_confusion():
    rows = [{"type": "a", "correct": True, "reference": "x", "prediction": "x"},
            {"type": "a", "correct": False, "reference": "x", "prediction": "z"},
            {"type": "b", "correct": True, "reference": "y", "prediction": "y"}]
    assert accuracy_by(rows, "type") == {"a": 0.5, "b": 1.0}
    assert confusion(rows) == (["x", "y", "z"], [[1, 0, 1], [0, 1, 0]])


def test_easy_vqa_on_a_folder_writes_its_outputs(folder, tmp_path, scripted, tiny_llava):
    results = evaluate_easy_vqa(tiny_llava, folder=str(folder), out=tmp_path / "eval")
    assert results["n"] == 6 and results["accuracy"] == pytest.approx(4 / 6)
    assert results["accuracy_by_type"] == {"colour": 1.0, "shape": 0.5, "yes/no": 0.5}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == "circle" and rows[0]["correct"]
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results


def test_limit_takes_a_fixed_seeded_sample(folder, scripted, tiny_llava):
    first = evaluate_easy_vqa(tiny_llava, folder=str(folder), limit=3)
    again = evaluate_easy_vqa(tiny_llava, folder=str(folder), limit=3)
    assert first == again and first["n"] == 3


def test_eval_command(folder, capsys):
    from polymodal.cli.main import main

    assert main(["eval", f"{RECIPES}/tiny-llava.yaml", "--task", "easy-vqa", "--data", str(folder),
                 "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"task", "split", "n", "accuracy"} <= out.keys() and out["n"] == 2
    assert main(["eval", f"{RECIPES}/tiny-llava.yaml", "--task", "vqa-v9"]) == 2
    assert "unknown task 'vqa-v9'; tasks: easy-vqa" in capsys.readouterr().err
