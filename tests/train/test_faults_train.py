"""Faults of issue 21 in training: each test is one kind of fault, tried on a tiny model."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from test_train import MODEL, recipe, synthetic_dataset, two_stage_recipe

from conftest import interrupted_run
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


def test_an_overwrite_that_fails_before_its_first_checkpoint_gives_the_old_run_back(tmp_path):
    from polymodal.train import replaced

    data = synthetic_dataset(tmp_path)
    run = tmp_path / "run"
    train(recipe(data, ["connector"], steps=2), run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match="data file not found"):
        train(recipe(tmp_path / "missing.json", ["connector"], steps=3), run, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # model, checkpoints, recipe and metrics, as they were
    # killed (kill -9) before its first checkpoint: the next start puts the old run back
    replaced.set_aside(run)
    (run / "recipe.yaml").write_text("name: the killed one\n")
    with pytest.raises(UserError, match="already holds a run"):
        train(recipe(data, ["connector"], steps=3), run)
    assert (run / "model" / "model.safetensors").read_bytes() == before[Path("model/model.safetensors")]
    assert (run / "recipe.yaml").read_bytes() == before[Path("recipe.yaml")]
    train(recipe(data, ["connector"], steps=3), run, overwrite=True)  # succeeds: the old run goes
    assert not (run / replaced.ASIDE).exists()


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
    (["stages.0.epochs=null", "stages.0.steps=3"], 3, None),  # tests/processing/test_audio.py's spelling
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


def test_a_run_saved_with_resolved_steps_beside_epochs_still_resumes(tmp_path):
    """Runs written before recipe_text kept the steps worked out from `epochs` in recipe.yaml."""
    import yaml

    from polymodal.config import load_recipe, to_dict
    from polymodal.train.run import resolve_epochs

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(epochs_recipe(synthetic_dataset(tmp_path), epochs=2)))
    recipe = load_recipe(path)
    train(recipe, tmp_path / "run")
    resolved = load_recipe(path)
    resolve_epochs(resolved)
    old = to_dict(resolved)  # as d8cd76a wrote it: resolved steps, no fields added since
    del old["init_from"]
    for stage in old["stages"]:
        del stage["validation"]
    assert old["stages"][0]["steps"] == 4 and old["stages"][0]["epochs"] == 2
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert train(load_recipe(path), tmp_path / "run", resume=True)["final_loss"] is not None
    (tmp_path / "run" / "recipe.yaml").write_text("name: another\n")
    with pytest.raises(UserError, match="the recipe differs"):
        train(load_recipe(path), tmp_path / "run", resume=True)


# ---------------------------------------------------------------- 4, 5: skipped samples


def long_and_short(folder, count=20):
    """`count` samples on synthetic images; the odd ones with a 60-word answer."""
    synthetic_dataset(folder)
    records = [{"id": f"s{i}", "image": f"{i % 8}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": " ".join(["apple"] * (60 if i % 2 else 1))}]} for i in range(count)]
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def length_between(path, config):
    """A max_length between the short samples' token count and the long ones'."""
    from polymodal.data.llava import read_llava_json
    from polymodal.model import MultimodalLM
    from polymodal.objectives.lm import lm_example

    model = MultimodalLM.from_config(config)
    lengths = {len(lm_example(model, s)["input_ids"]) for s in read_llava_json(path)}
    assert len(lengths) == 2
    return (min(lengths) + max(lengths)) // 2


def test_too_long_samples_are_listed_counted_on_the_console_and_held_to_the_bad_threshold(tmp_path, capsys):
    path = long_and_short(tmp_path)
    limit = length_between(path, recipe(path, ["connector"], steps=1))
    with pytest.raises(UserError, match=rf"{path}: 10 of 20 samples are bad or too long \(more than 1%\); "
                                        rf"first: s1: longer than max_length {limit}"):
        train(recipe(path, ["connector"], steps=1, max_length=limit), tmp_path / "stopped")
    train(recipe(path, ["connector"], steps=1, max_length=limit, max_bad_fraction=0.5), tmp_path / "run")
    err = capsys.readouterr().err
    assert f"{path}: skipped 10 of 20 samples (0 bad, 10 longer than max_length {limit})" in err
    rows = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(1, 20, 2)]
    assert {r["reason"] for r in rows} == {f"longer than max_length {limit}"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["only"]["skipped_too_long"] == 10


def test_bad_and_too_long_samples_count_together_against_the_threshold(tmp_path):
    path = long_and_short(tmp_path)
    limit = length_between(path, recipe(path, ["connector"], steps=1))
    (tmp_path / "0.png").write_text("not a png")  # s0 and s8 and s16 are bad (image 0); 10 too long
    with pytest.raises(UserError, match=r"13 of 20 samples are bad or too long \(more than 60%\)"):
        train(recipe(path, ["connector"], steps=1, max_length=limit, max_bad_fraction=0.6), tmp_path / "run")
    train(recipe(path, ["connector"], steps=1, max_length=limit, max_bad_fraction=0.65), tmp_path / "ok")


def test_a_conversation_the_chat_template_refuses_is_a_listed_bad_sample(tmp_path, monkeypatch):
    from polymodal.llm import LanguageModel

    path = long_and_short(tmp_path)
    render = LanguageModel.render

    def strict(self, messages, add_generation_prompt):
        if any("apple apple" in m["content"] for m in messages):  # as a template's raise_exception
            raise UserError("the chat template refused the conversation: too many apples")
        return render(self, messages, add_generation_prompt)

    monkeypatch.setattr(LanguageModel, "render", strict)
    train(recipe(path, ["connector"], steps=1, max_bad_fraction=0.5), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(1, 20, 2)]
    assert {r["reason"] for r in rows} == {"the chat template refused the conversation: too many apples"}


def test_each_bad_sample_is_listed_once_over_stages_and_resumes(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    (tmp_path / "3.png").write_text("not a png")
    config = two_stage_recipe(path)
    for stage in config.stages:
        stage.max_bad_fraction = 0.2
    # stopped in the second stage, after its first checkpoint
    interrupted_run(monkeypatch, config, tmp_path / "run", at_call=9)
    train(config, tmp_path / "run", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["id"]) for r in rows] == [(str(path), "3")]


# ---------------------------------------------------------------- 3: resume reads the same data


def one_stage_with_checkpoints(path):
    return from_dict(RecipeConfig, {"name": "ck", "model": MODEL, "checkpoint": {"every": 2, "keep": 3},
                                    "stages": [{"name": "align", "train": ["connector"], "lr": {"connector": 1e-3},
                                                "steps": 6, "batch_size": 4, "log_every": 1,
                                                "data": [{"format": "llava", "path": str(path)}]}]})


@pytest.mark.parametrize("change", ["image", "records"])
def test_resume_on_changed_data_is_refused_naming_the_file(tmp_path, monkeypatch, change):
    from PIL import Image

    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    interrupted_run(monkeypatch, config, tmp_path / "run", at_call=4)  # after step 2's checkpoint
    if change == "image":
        Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "5.png")  # same name, other pixels
        changed = str(tmp_path / "5.png")
    else:
        records = json.loads(path.read_text())
        records[2]["conversations"][1]["value"] = "pear"
        path.write_text(json.dumps(records))
        changed = str(path)
    with pytest.raises(UserError, match=rf"--resume: {changed} \(dataset 0 of stage 'align'\) changed"):
        train(config, tmp_path / "run", resume=True)


def test_resume_on_the_same_data_written_again_continues(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    interrupted_run(monkeypatch, config, tmp_path / "run", at_call=4)
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2))  # other bytes, same records
    train(config, tmp_path / "run", resume=True)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 8: a damaged newest checkpoint


def damage(checkpoint, how):
    if how == "weights cut short":
        weights = checkpoint / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "weights.safetensors"
    if how == "optimizer garbage":
        (checkpoint / "optimizer.safetensors").write_bytes(b"\0" * 64)
        return "optimizer.safetensors"
    (checkpoint / "meta.json").write_text('{"stage_index": 0, "st')
    return "meta.json"


@pytest.mark.parametrize("how", ["weights cut short", "optimizer garbage", "meta cut short"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_one_before(tmp_path, monkeypatch, capsys, how):
    from test_train import weights

    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    interrupted_run(monkeypatch, config, tmp_path / "run", at_call=6)  # checkpoints 2 and 4
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]
    file = damage(checkpoints / "step-0000004", how)
    capsys.readouterr()
    train(config, tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert f"skipped checkpoint step-0000004 ({file}: " in err and "resuming from step-0000002" in err
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    if how == "weights cut short":  # from step 2 on, the resumed run is the uninterrupted one
        train(config, tmp_path / "straight")
        straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "run")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_with_every_checkpoint_damaged_says_why_for_each(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    interrupted_run(monkeypatch, config, tmp_path / "run", at_call=6)
    for name in ("step-0000002", "step-0000004"):
        damage(tmp_path / "run" / "checkpoints" / name, "meta cut short")
    with pytest.raises(UserError, match=r"no usable checkpoint in .*: skipped checkpoint step-0000004 "
                                        r"\(meta.json: .*\); skipped checkpoint step-0000002"):
        train(config, tmp_path / "run", resume=True)


# ---------------------------------------------------------------- 7: a full disk


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fill_disk_at(monkeypatch, where, run):
    """Make the write of `where` (a run file) fail as on a full disk."""
    import matplotlib.figure

    from polymodal.model import MultimodalLM
    from polymodal.train import run as run_module

    if where == "model":
        monkeypatch.setattr(MultimodalLM, "save_pretrained", full_disk)
    elif where == "loss.png":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    elif where == "metrics.jsonl":
        monkeypatch.setattr(run_module, "open", full_disk, raising=False)
    else:  # recipe.yaml, summary.json: atomic writes
        atomic_write = run_module.atomic_write
        monkeypatch.setattr(run_module, "atomic_write",
                            lambda path, write: full_disk() if path.name == where else atomic_write(path, write))


@pytest.mark.parametrize("where", ["recipe.yaml", "metrics.jsonl", "model", "loss.png", "summary.json"])
def test_a_full_disk_anywhere_in_a_run_is_one_line_and_keeps_the_last_good_state(tmp_path, monkeypatch, where):
    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    run = tmp_path / "run"
    fill_disk_at(monkeypatch, where, run)
    with pytest.raises(UserError) as failed:
        train(config, run)
    message = str(failed.value)
    assert message.startswith(f"disk full writing {run / where}; ") and "\n" not in message
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    if checkpoints:  # a failure after training names the checkpoint to resume from
        assert f"the last checkpoint is {checkpoints[-1]}: free space and rerun with --resume" in message
    assert not [p.name for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    model_files = sorted(p.name for p in (run / "model").glob("*"))  # none, or all: never half
    assert not model_files or {"config.json", "model.safetensors"} <= set(model_files)
    assert bool(model_files) == (where in ("loss.png", "summary.json"))  # saved before those
    monkeypatch.undo()
    if checkpoints:  # the disk has room again: --resume completes the run
        train(config, run, resume=True)
        assert (run / "model" / "config.json").is_file() and (run / "loss.png").is_file()


def test_a_full_disk_while_replacing_a_model_keeps_the_old_one(tmp_path, monkeypatch):
    from polymodal.model import MultimodalLM

    path = synthetic_dataset(tmp_path)
    run = tmp_path / "run"
    train(recipe(path, ["connector"], steps=1), run)
    before = (run / "model" / "model.safetensors").read_bytes()
    monkeypatch.setattr(MultimodalLM, "save_pretrained", full_disk)
    with pytest.raises(UserError, match="disk full writing"):
        train(recipe(path, ["connector"], steps=1), run, resume=True)
    assert (run / "model" / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------- 9: signals and stale temp files


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_train_saying_what_was_kept_and_the_exact_resume_command(
        tmp_path, monkeypatch, capsys, signal_name, code):
    import shlex
    import signal

    from polymodal.cli.main import main
    from polymodal.model import MultimodalLM

    recipe_path = recipe_file(tmp_path, synthetic_dataset(tmp_path), steps=50, log_every=1)
    run = tmp_path / "run dir"  # a space: the printed command must quote it
    command = ["train", str(recipe_path), "--set", "stages.0.steps=6", "--set", "checkpoint.every=2",
               "--out", str(run)]
    forward, calls = MultimodalLM.forward, []

    def signalled(self, batch):
        calls.append(1)
        if len(calls) == 5:  # step 5: after the checkpoint of step 4
            os.kill(os.getpid(), getattr(signal, signal_name))
        return forward(self, batch)

    monkeypatch.setattr(MultimodalLM, "forward", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(command) == code
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"stopped by {signal_name}; kept checkpoint step-0000004 (stage 1, step 4); "
                                "resume with: polymodal train ")
    printed = shlex.split(lines[-1].split("resume with: ", 1)[1])
    assert printed == ["polymodal", *command, "--resume"]
    assert not list(run.rglob("*.tmp-*")) and not list(run.rglob(".tmp-*"))
    monkeypatch.setattr(MultimodalLM, "forward", forward)
    assert main(printed[1:]) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_run_stopped_before_its_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    from polymodal.cli.main import main
    from polymodal.model import MultimodalLM

    def stopped(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(MultimodalLM, "forward", stopped)
    recipe_path = recipe_file(tmp_path, synthetic_dataset(tmp_path))
    assert main(["train", str(recipe_path), "--out", str(tmp_path / "run")]) == 130
    assert "stopped by SIGINT before the first checkpoint" in capsys.readouterr().err


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    config = one_stage_with_checkpoints(path)
    run = tmp_path / "run"
    interrupted_run(monkeypatch, config, run, at_call=4)
    # what `kill -9` leaves: a checkpoint folder and atomic writes that never got renamed
    (run / "checkpoints" / ".tmp-k9x").mkdir()
    (run / "checkpoints" / ".tmp-k9x" / "weights.safetensors").write_bytes(b"partial")
    (run / ".metrics.jsonl.tmp-99999").write_text("partial")
    (run / ".model.tmp-99999").mkdir()
    train(config, run, resume=True)
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_a_model_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    from polymodal.train.run_files import remove_stale_temps

    run = tmp_path / "run"
    (run / ".model.old-4242").mkdir(parents=True)
    (run / ".model.old-4242" / "config.json").write_text("{}")
    remove_stale_temps(run)
    assert (run / "model" / "config.json").read_text() == "{}" and not list(run.glob(".model.*"))


# ---------------------------------------------------------------- 10: big inputs


def test_encoding_shows_progress_and_keeps_token_ids_compact(tmp_path, capsys):
    from array import array

    from polymodal.config import DatasetConfig, StageConfig
    from polymodal.data.llava import read_llava_json
    from polymodal.model import MultimodalLM
    from polymodal.objectives.lm import LanguageModeling, lm_example
    from polymodal.train.mixture import Mixture, encode_dataset

    path = long_and_short(tmp_path)
    config = recipe(path, ["connector"], steps=1)
    model = MultimodalLM.from_config(config)
    dataset = DatasetConfig(format="llava", path=str(path))
    stage = StageConfig(name="s", train=["connector"], lr={"connector": 1e-3}, data=[dataset], batch_size=4)
    objective = LanguageModeling(stage, model)
    encoded = encode_dataset(objective, dataset, tmp_path / "bad.jsonl")
    err = capsys.readouterr().err
    assert f"encoding {path}" in err and "sample/s" in err  # tqdm's bar, with its rate
    stored = encoded.samples.rows
    assert all(isinstance(row[key], array) and row[key].itemsize == 4
               for row in stored for key in ("input_ids", "labels"))
    # the memo's shared lists stay shared: the 10 short samples ask one text, one array
    assert len({id(row["input_ids"]) for row in stored}) == 2
    # each read gives back what the model made of the sample, as plain lists
    assert list(encoded.samples) == [lm_example(model, s) for s in read_llava_json(path)]
    batch = Mixture([encoded], objective).batch(0)
    assert batch.input_ids.shape[0] == 4
