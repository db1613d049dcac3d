"""The `series-classification` task: answers read as labels, accuracy overall and per class,
the confusion matrix and predictions.jsonl, its data from a series file or `aeon:NAME`."""

import json

import numpy as np
import pytest

from polymodal.data.sample import Item
from polymodal.errors import UserError
from polymodal.eval.series_classification import NO_LABEL, SeriesClassification, read_label
from polymodal.eval.tasks import TaskOptions, get_task, named_dataset

LABELS = ["badminton", "running", "standing", "standing up", "walking", "1", "10"]


@pytest.mark.parametrize("answer, label", [
    ("walking", "walking"),
    ("  Walking.\n", "walking"),  # case, spaces and surrounding punctuation
    ("The person is RUNNING!", "running"),  # names exactly one label
    ("walking or running", None),  # names two
    ("sitting", None),  # names none
    ("", None),
    ("he is standing up", "standing up"),  # the longer label it names, not also "standing"
    ("standing", "standing"),
    ("class 10", "10"),  # whole words: "1" is not inside "10"
    ("class 1 or 10", None),
    ("badminton1", None),  # not a whole word
])
def test_an_answer_counts_as_the_one_label_it_names(answer, label):
    assert read_label(answer, LABELS) == label


def items(labels: list[str]) -> list[Item]:
    return [Item(f"s{i}", "What activity is this?", [], [label], {"type": "class", "label": label},
                 media={"series": [f"s{i}.npy"]}) for i, label in enumerate(labels)]


def test_scores_accuracy_per_class_and_draws_the_confusion_matrix(tmp_path):
    from polymodal.eval.report import write_outputs

    task = get_task("series-classification")
    questions = items(["walking", "walking", "running", "running"])
    results, rows = task.score(questions, ["Walking.", "running", "running", "walking or running"])
    assert results["accuracy"] == 0.5 and results["accuracy_by_class"] == {"running": 0.5, "walking": 0.5}
    assert results["balanced_accuracy"] == 0.5 and results["no_label"] == 1 and results["classes"] == 2
    assert [row["normalized"] for row in rows] == ["walking", "running", "running", NO_LABEL]
    assert rows[0]["prediction"] == "Walking." and rows[0]["reference"] == "walking" and rows[0]["label"] == "walking"
    write_outputs(tmp_path, "series", results, rows)
    task.pictures(results, rows, tmp_path)
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["correct"] for line in lines] == [True, False, True, False]


def test_a_label_absent_from_a_sample_still_counts_as_a_label():
    task = SeriesClassification()
    task.labels = ["running", "standing", "walking"]  # the whole set's, read by items()
    results, rows = task.score(items(["walking"]), ["standing"])
    assert rows[0]["normalized"] == "standing" and results["no_label"] == 0 and results["classes"] == 3


def test_data_is_required_and_aeon_names_a_set():
    with pytest.raises(UserError, match="needs --data: aeon:NAME"):
        get_task("series-classification").items(TaskOptions())
    assert named_dataset("aeon:BasicMotions") == ("aeon", "BasicMotions")
    assert named_dataset("nowhere/file.jsonl") is None and named_dataset("no_format:x") is None


def test_answers_of_a_stand_in_model_are_scored_end_to_end(tmp_path, monkeypatch):
    """The task's run without a model: answers stand in for generation, so what is checked is
    the path from items to files (the model's own path: the tiny model test below)."""
    from polymodal.eval import answer
    from polymodal.eval.run import evaluate

    questions = items(["walking", "running", "walking"])
    monkeypatch.setattr(answer, "answer_items", lambda model, items, *a, **k: [
        f"It is {item.references[0]}." for item in items])
    results, _ = evaluate(object(), "series-classification", TaskOptions(data="x"), out=tmp_path,
                          items=questions)
    assert results["accuracy"] == 1.0 and results["n"] == 3
    assert {"results.json", "predictions.jsonl", "report.md", "confusion.png"} <= {p.name for p in tmp_path.iterdir()}


def write_manifest(folder, labels: list[str], steps: int = 24, channels: int = 3) -> str:
    """A `series` format manifest: one .npy [T, C] per label, sines of a frequency per class."""
    lines = []
    for index, label in enumerate(labels):
        hertz = 1.0 + labels.index(label)
        values = np.sin(hertz * np.arange(steps)[:, None] / 4 + np.arange(channels)[None, :] + index)
        np.save(folder / f"s{index}.npy", values.astype(np.float32))
        lines.append(json.dumps({"series": f"s{index}.npy", "label": label, "question": "What activity is this?"}))
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "test.jsonl")


def test_a_tiny_model_answers_a_series_file_and_every_output_is_written(tmp_path):
    from conftest import tiny_series_model
    from polymodal.eval.run import evaluate

    manifest = write_manifest(tmp_path, ["walking", "running", "walking", "standing"])
    task = get_task("series-classification")
    questions = task.items(TaskOptions(data=manifest))
    assert [q.references[0] for q in questions] == ["walking", "running", "walking", "standing"]
    assert questions[0].media["series"][0].endswith("s0.npy") and questions[0].info["type"] == "class"
    results, rows = evaluate(tiny_series_model(channels=3, length=32), task, TaskOptions(data=manifest),
                             batch_size=3, out=tmp_path / "out", items=questions)
    assert results["n"] == 4 and results["classes"] == 3 and 0 <= results["accuracy"] <= 1
    assert len(rows) == 4 and all(row["normalized"] in {*task.labels, NO_LABEL} for row in rows)
    assert (tmp_path / "out" / "confusion.png").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["task"] == "series-classification" and saved["accuracy_by_class"].keys() == {"running", "standing", "walking"}


def test_forecasting_windows_are_not_classification_questions(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32))
    (tmp_path / "f.jsonl").write_text(json.dumps({"series": "a.npy", "future": [12, 13]}) + "\n")
    with pytest.raises(UserError, match="holds no labelled series"):
        get_task("series-classification").items(TaskOptions(data=str(tmp_path / "f.jsonl")))


def test_eval_of_aeon_basic_motions_from_the_command_line(capsys, tmp_path, monkeypatch):
    """The issue's command, on a tiny model of BasicMotions' size (6 channels, 100 steps)."""
    from conftest import tiny_series_model
    from polymodal.cli.main import main

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    everything = get_task("series-classification").items(TaskOptions(data="aeon:BasicMotions"))
    assert len(everything) == 40 and {q.references[0] for q in everything} == {"badminton", "running", "standing", "walking"}
    tiny_series_model(channels=6, length=100).save_pretrained(tmp_path / "model")
    code = main(["eval", str(tmp_path / "model"), "--task", "series-classification", "--data", "aeon:BasicMotions",
                 "--limit", "4", "--out", str(tmp_path / "out")])
    results = json.loads(capsys.readouterr().out)
    assert code == 0 and results["n"] == 4 and results["split"] == "aeon:BasicMotions" and results["classes"] == 4
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 4
    assert main(["eval", str(tmp_path / "model"), "--task", "series-classification", "--data", "aeon:NoSuchSet"]) == 2
    assert "not bundled" in capsys.readouterr().err


def test_a_series_longer_than_the_fitted_length_is_cropped_and_counted(tmp_path, capsys):
    """JapaneseVowels' case: the length is fitted to the training split (here 24 steps), a
    test series is longer (30): it is evaluated on its last 24 steps, and counted."""
    import torch

    from polymodal.config import ModelConfig, from_dict
    from polymodal.encoders.patchtst import PatchTSTConfig, PatchTSTEncoder
    from polymodal.eval.run import evaluate
    from polymodal.model import MultimodalLM

    train = [tmp_path / "train0.npy", tmp_path / "train1.npy"]
    for path, steps in zip(train, (20, 24)):
        np.save(path, np.zeros((steps, 2), dtype=np.float32))
    fitted = PatchTSTEncoder.fit_to_data(PatchTSTConfig(), train)
    assert (fitted.channels, fitted.length) == (2, 24)
    torch.manual_seed(0)
    model = MultimodalLM(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "connectors": {"series": {"kind": "mlp"}},
        "encoders": {"series": {"kind": "patchtst", "channels": fitted.channels, "length": fitted.length}}})).eval()
    lines = []
    for index, steps in enumerate((12, 24, 30)):
        np.save(tmp_path / f"t{index}.npy", np.sin(np.arange(steps * 2, dtype=np.float32) / 3).reshape(steps, 2))
        lines.append(json.dumps({"series": f"t{index}.npy", "label": ["walking", "running"][index % 2]}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    results, rows = evaluate(model, "series-classification", TaskOptions(data=str(tmp_path / "test.jsonl")),
                             out=tmp_path / "out")
    assert results["n"] == 3 and len(rows) == 3 and results["cropped"] == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["cropped"] == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "cropped" in line]
    assert said == ["series-classification: 1 of 3 series are longer than the encoder's length 24; "
                    "each was cropped to its last 24 steps"]
