"""`polymodal chat MODEL --series FILE.csv "What activity is this?"` and the REPL's /series:
the model answers as it does alone; a bad file, a series the encoder cannot take and a
model without a series encoder are one line and exit 2."""

import numpy as np
import pytest

from conftest import tiny_series_model
from polymodal.cli.main import main
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams

QUESTION = "What activity is this?"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_csv(path, steps: int, channels: int = 3, hertz: float = 1.0) -> str:
    time = np.arange(steps)[:, None] / 10
    values = np.sin(hertz * time + np.arange(channels)[None, :])  # [T, C], time first
    header = ",".join(f"axis{c}" for c in range(channels))
    np.savetxt(path, values, delimiter=",", header=header, comments="", fmt="%.5f")
    return str(path)


@pytest.fixture
def saved(tmp_path):
    model = tiny_series_model(channels=3, length=32)
    model.save_pretrained(tmp_path / "model")
    return model, str(tmp_path / "model")


def answer_alone(model, path: str, max_new_tokens: int = 4) -> str:
    prompt = {"messages": [{"role": "user", "content": f"<series>\n{QUESTION}"}], "media": {"series": [path]}}
    return Engine(model).generate([prompt], SamplingParams(max_new_tokens=max_new_tokens))[0].text


def test_chat_answers_a_series_file_as_the_model_does_alone(capsys, monkeypatch, tmp_path, saved):
    from polymodal.encoders.series_base import SeriesEncoder

    model, folder = saved
    series = write_csv(tmp_path / "walk.csv", 20)
    loaded = []  # what reached the encoder (a random tiny model's text may not show it)
    load = SeriesEncoder.load_media
    monkeypatch.setattr(SeriesEncoder, "load_media", lambda self, path: loaded.append(path) or load(self, path))
    code, out, _ = run(capsys, "chat", folder, "--series", series, "--max-new-tokens", "4", QUESTION)
    assert code == 0 and loaded == [series]
    assert out == answer_alone(model, series) + "\n"


def test_the_repl_attaches_series_and_names_a_bad_file(capsys, monkeypatch, tmp_path, saved):
    _, folder = saved
    series = write_csv(tmp_path / "walk.csv", 20)
    lines = iter([f"/series {series}", QUESTION, "/series nowhere.csv", "/series", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    code, _, err = run(capsys, "chat", folder, "--max-new-tokens", "2")
    assert code == 0 and "series attached; 1 pending" in err
    assert "series file not found: nowhere.csv" in err and "usage: /series PATH" in err


def test_a_series_the_encoder_cannot_take_is_one_line(capsys, tmp_path, saved):
    _, folder = saved
    series = write_csv(tmp_path / "wide.csv", 20, 5)
    code, _, err = run(capsys, "chat", folder, "--series", series, QUESTION)
    assert code == 2 and "series of 5 channels has more than the encoder's 3" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_a_series_longer_than_the_encoder_is_answered_as_its_last_length_steps(capsys, tmp_path, saved):
    model, folder = saved
    series = write_csv(tmp_path / "long.csv", 40)  # the encoder's length is 32
    last = tmp_path / "last.npy"
    np.save(last, np.loadtxt(series, delimiter=",", skiprows=1)[-32:])
    code, out, _ = run(capsys, "chat", folder, "--series", series, "--max-new-tokens", "4", QUESTION)
    assert code == 0 and out == answer_alone(model, str(last)) + "\n"


def test_mistakes_before_the_model_loads_and_a_model_without_series(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,nan\n")
    code, _, err = run(capsys, "chat", "tiny:llama", "--series", str(bad), QUESTION)
    assert code == 2 and "has NaN at step 1 of channel 1" in err.splitlines()[-1]
    assert not err.startswith("loading")  # named before a slow load
    code, _, err = run(capsys, "chat", "tiny:llama", "--series", write_csv(tmp_path / "s.csv", 8), QUESTION)
    assert code == 2 and "this model has no series encoder" in err.splitlines()[-1]


def test_a_recipe_whose_sizes_come_from_the_data_says_to_train_first(capsys, tmp_path):
    recipe = tmp_path / "series.yaml"
    recipe.write_text("model:\n  llm: {source: tiny:llama}\n  encoders: {series: {kind: patchtst}}\n"
                      "  connectors: {series: {kind: mlp}}\n")
    code, _, err = run(capsys, "chat", str(recipe), "--series", write_csv(tmp_path / "s.csv", 8), QUESTION)
    assert code == 2 and "train the recipe first" in err.splitlines()[-1]
