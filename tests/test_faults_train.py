"""Faults of issue 21 in training: each test is one kind of fault, tried on a tiny model."""

import json
import os

import pytest
from test_train import MODEL, recipe, synthetic_dataset

from polymodal.config import RecipeConfig, from_dict
from polymodal.errors import UserError
from polymodal.train.run import train


def recipe_file(folder, data, steps=2, **stage):
    """A recipe YAML (JSON is YAML) of one connector stage on `data`."""
    path = folder / "recipe.yaml"
    path.write_text(json.dumps({"name": "faults", "model": MODEL, "stages": [
        {"name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "steps": steps,
         "batch_size": 4, "data": [{"format": "llava", "path": str(data)}], **stage}]}))
    return path


# ---------------------------------------------------------------- 1: an existing run is kept


def test_training_again_into_a_trained_run_is_refused_unless_resume_or_overwrite(tmp_path):
    data = synthetic_dataset(tmp_path)
    run = tmp_path / "run"
    train(recipe(data, ["connector"], steps=2), run)
    model_bytes = (run / "model" / "model.safetensors").read_bytes()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UserError) as refused:
        train(recipe(data, ["connector"], steps=3), run)
    message = str(refused.value)
    assert str(run) in message and "--resume" in message and "--overwrite" in message
    assert "\n" not in message
    assert (run / "model" / "model.safetensors").read_bytes() == model_bytes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    train(recipe(data, ["connector"], steps=3), run, overwrite=True)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [3]  # the new run's, none of the old one's


def test_the_train_command_names_both_flags_when_it_refuses(tmp_path, capsys):
    from polymodal.cli.main import main

    path = recipe_file(tmp_path, synthetic_dataset(tmp_path))
    out = str(tmp_path / "run")
    assert main(["train", str(path), "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--out", out]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and out in error and "--resume" in error and "--overwrite" in error
    assert main(["train", str(path), "--out", out, "--overwrite"]) == 0


# ---------------------------------------------------------------- 6: one writer per run directory


def test_a_second_writer_into_a_locked_run_directory_fails_naming_the_holder(tmp_path):
    from polymodal.locks import exclusive

    data = synthetic_dataset(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    with exclusive(run / ".lock", "test holder"):
        with pytest.raises(UserError, match=rf"run directory {run} is in use by pid {os.getpid()}"):
            train(recipe(data, ["connector"], steps=2), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written by the second
    train(recipe(data, ["connector"], steps=2), run)  # free again once the holder is done
    assert (run / "model" / "config.json").is_file()


# ---------------------------------------------------------------- 2: steps and epochs


def epochs_recipe(data, **extra):
    return {"name": "len", "model": MODEL, "stages": [
        {"name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "batch_size": 4,
         "data": [{"format": "llava", "path": str(data)}], **extra}]}


def test_a_stage_with_both_steps_and_epochs_is_an_error_naming_both(tmp_path):
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\[0\]\.steps and epochs: both set"):
        from_dict(RecipeConfig, epochs_recipe(tmp_path / "d.json", steps=5, epochs=2))
    assert from_dict(RecipeConfig, epochs_recipe(tmp_path / "d.json")).stages[0].steps == 100


@pytest.mark.parametrize(("overrides", "steps", "epochs"), [
    (["stages.0.steps=5"], 5, None),  # the case: the stage sets epochs in the file
    (["stages.0.steps=5", "stages.0.epochs=3"], None, 3),  # the last one typed wins
    (["stages.0.epochs=null", "stages.0.steps=3"], 3, None),  # tests/test_audio.py's spelling
])
def test_setting_steps_or_epochs_on_the_command_line_replaces_the_other(tmp_path, overrides, steps, epochs):
    from polymodal.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(epochs_recipe(tmp_path / "d.json", epochs=2)))
    stage = load_recipe(path, overrides).stages[0]
    assert (stage.steps, stage.epochs) == (steps, epochs)


def test_steps_set_over_epochs_is_what_trains_and_the_saved_recipe_loads_again(tmp_path):
    from polymodal.config import load_recipe

    data = synthetic_dataset(tmp_path)  # 8 samples: 2 epochs of batch 4 would be 4 steps
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**epochs_recipe(data, epochs=2, log_every=1)}))
    train(load_recipe(path, ["stages.0.steps=3"]), tmp_path / "steps")
    rows = (tmp_path / "steps" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    train(load_recipe(path), tmp_path / "epochs")
    rows = (tmp_path / "epochs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
    again = load_recipe(tmp_path / "epochs" / "recipe.yaml").stages[0]  # no steps+epochs conflict
    assert (again.steps, again.epochs) == (None, 2)
