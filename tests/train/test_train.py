"""Training: the loss goes down, a tiny model memorises, frozen parts stay put, bad input stops."""

import json

import pytest
import torch
from PIL import Image

from conftest import ddp_and_single_losses, interrupted_run
from polymodal.config import RecipeConfig, from_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.model import MultimodalLM
from polymodal.train.loop import NonFiniteLoss
from polymodal.train.run import train

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ghost"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0)]
MODEL = {"llm": {"source": "tiny:llama"},
         "encoder": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
         "connector": {"kind": "mlp", "depth": 2}}


def synthetic_dataset(folder, count=8):
    """`count` solid-colour images, each with its own one-word answer, as LLaVA JSON."""
    records = []
    for index in range(count):
        Image.new("RGB", (32, 32), COLOURS[index]).save(folder / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": WORDS[index]}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def recipe(path, train_parts, steps, lr=3e-3, **stage):
    return from_dict(RecipeConfig, {"name": "test", "model": MODEL, "stages": [{
        "name": "only", "train": train_parts, "lr": dict.fromkeys(train_parts, lr), "steps": steps,
        "batch_size": 8, "log_every": 5, "data": [{"format": "llava", "path": str(path)}], **stage}]})


def answers(model, folder):
    prompts = [{"messages": [{"role": "user", "content": "<image>\nWhat is this?"}],
                "images": [str(folder / f"{i}.png")]} for i in range(len(WORDS))]
    return [c.text for c in Engine(model).generate(prompts, SamplingParams(max_new_tokens=6))]


def test_tiny_model_memorises_eight_pairs_and_the_run_directory_is_complete(tmp_path):
    path = synthetic_dataset(tmp_path)
    summary = train(recipe(path, ["encoder", "connector", "llm"], steps=120), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "loss.png", "summary.json", "model/config.json"):
        assert (run / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 10
    assert summary["stages"]["only"]["samples"] == 120 * 8 and summary["train_seconds"] > 0
    model = MultimodalLM.from_pretrained(run / "model")
    assert answers(model, tmp_path) == WORDS


def test_frozen_parts_stay_bit_identical(tmp_path):
    path = synthetic_dataset(tmp_path)
    config = recipe(path, ["connector"], steps=3)
    model = MultimodalLM.from_config(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(config, tmp_path / "run", model)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == name.startswith("connectors.image."), name


def lora_then_connector(path) -> RecipeConfig:
    """Adapters trained first (so they are not zero), then a stage for the connector alone."""
    model = {**MODEL, "llm": {**MODEL["llm"], "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}
    stages = [{"name": name, "train": parts, "lr": dict.fromkeys(parts, 3e-3), "steps": 3, "batch_size": 4,
               "data": [{"format": "llava", "path": str(path)}]}
              for name, parts in (("tune", ["llm.lora"]), ("align", ["connector"]))]
    return from_dict(RecipeConfig, {"name": "fold", "model": model, "stages": stages})


def test_a_stage_that_freezes_the_adapters_runs_them_folded_in(tmp_path, monkeypatch):
    """The connector-only stage runs the LLM with its (trained, non-zero) adapters folded into
    the base weights: no adapter matmul in its steps, the same connector as running them
    unfolded (to float round-off), and the LLM's weights bit-identical afterwards."""
    from contextlib import nullcontext

    from polymodal.objectives.lm import LanguageModeling

    config = lora_then_connector(synthetic_dataset(tmp_path))
    models, adapter_runs = {}, {}
    for folded in (True, False):
        if not folded:
            monkeypatch.setattr(LanguageModeling, "stage_context", lambda self: nullcontext())
        torch.manual_seed(0)
        model = MultimodalLM.from_config(config)
        adapter_runs[folded] = 0
        first_adapter = next(m for n, m in model.llm.named_modules() if n.endswith("lora_A.default"))
        first_adapter.register_forward_hook(lambda *_, f=folded: adapter_runs.__setitem__(f, adapter_runs[f] + 1))
        train(config, tmp_path / f"run-{folded}", model)
        models[folded] = dict(model.named_parameters())
    assert adapter_runs == {True: 3, False: 6}  # one forward per step: tune's 3, then align's 3 unless folded
    for name, parameter in models[True].items():
        if name.startswith("connectors.image."):
            # 3 Adam steps of 3e-3 move a weight by up to 9e-3; round-off in a near-zero
            # gradient can move one by ~1e-4 differently (Adam divides by its size)
            torch.testing.assert_close(parameter, models[False][name], rtol=0, atol=3e-4)
        else:
            assert torch.equal(parameter, models[False][name]), name


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    config = recipe(path, ["connector"], steps=5)
    model = MultimodalLM.from_config(config)
    forward = model.forward
    calls = []

    def poisoned(batch):
        calls.append(1)
        output = forward(batch)
        if len(calls) == 3:
            output.logits = output.logits * float("nan")
        return output

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 3 of stage 'only'"):
        train(config, tmp_path / "run", model)


def test_a_nan_loss_exits_1_with_one_line_naming_the_step_and_stage(tmp_path, monkeypatch, capsys):
    """Divergence is not the user's typo (exit 2): one line naming step and stage, exit 1."""
    from polymodal.cli.main import main

    forward = MultimodalLM.forward

    def diverged(self, batch):
        output = forward(self, batch)
        output.logits = output.logits * float("nan")
        return output

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({"name": "nan", "model": MODEL, "stages": [
        {"name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "steps": 3,
         "data": [{"format": "llava", "path": str(synthetic_dataset(tmp_path))}]}]}))
    monkeypatch.setattr(MultimodalLM, "forward", diverged)
    assert main(["train", str(recipe_file), "--out", str(tmp_path / "run")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("polymodal: error: loss is nan at step 1 of stage 'align'; stopped")
    assert "Traceback" not in "\n".join(lines)


def test_tensorboard_events_hold_the_logged_losses_and_learning_rates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = two_stage_recipe(synthetic_dataset(tmp_path), steps=3)
    train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for stage in ("align", "tune"):
        logged = [(row["global_step"], row["loss"]) for row in rows if row["stage"] == stage]
        scalars = [(event.step, event.value) for event in events.Scalars(f"loss/{stage}")]
        assert [step for step, _ in scalars] == [step for step, _ in logged]
        assert [value for _, value in scalars] == pytest.approx([loss for _, loss in logged], rel=1e-6)
    rates = [event.value for event in events.Scalars("learning_rate/tune/llm")]
    assert rates == pytest.approx([row["learning_rates"]["llm"] for row in rows if row["stage"] == "tune"])


def test_too_many_bad_samples_stop_before_training(tmp_path):
    path = synthetic_dataset(tmp_path)
    (tmp_path / "0.png").write_text("not a png")
    with pytest.raises(UserError, match="1 of 8 samples are bad"):
        train(recipe(path, ["connector"], steps=2), tmp_path / "run")
    assert "not an image" in (tmp_path / "run" / "bad_samples.jsonl").read_text()
    train(recipe(path, ["connector"], steps=2, max_bad_fraction=0.2), tmp_path / "run")  # tolerated


def test_stage_config_errors_name_the_field():
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr: no learning rate for trained part 'llm'"):
        from_dict(RecipeConfig, {"name": "x", "model": MODEL, "stages": [
            {"name": "a", "train": ["llm"], "lr": {"connector": 1e-3}, "data": [{"format": "easy-vqa"}]}]})


def test_train_command(tmp_path, capsys):
    from polymodal.cli.main import main

    path = synthetic_dataset(tmp_path)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({"name": "cli", "model": MODEL, "stages": [
        {"name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "steps": 50,
         "data": [{"format": "llava", "path": str(path)}]}]}))
    code = main(["train", str(recipe_file), "--set", "stages.0.steps=2", "--out", str(tmp_path / "run")])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["model"] == f"{tmp_path}/run/model"
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2]
    assert main(["train", str(recipe_file), "--set", "stages.3.steps=2"]) == 2


def two_stage_recipe(path, steps=6, every=2):
    return from_dict(RecipeConfig, {"name": "resume", "model": MODEL, "checkpoint": {"every": every, "keep": 2},
                                    "stages": [
        {"name": "align", "train": ["connector"], "lr": {"connector": 1e-3}, "steps": steps,
         "batch_size": 4, "log_every": 1, "data": [{"format": "llava", "path": str(path)}]},
        {"name": "tune", "train": ["connector", "llm"], "lr": {"connector": 1e-3, "llm": 1e-3},
         "steps": steps, "batch_size": 4, "log_every": 1, "data": [{"format": "llava", "path": str(path)}]}]})


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


def saved_parts(checkpoint_dir):
    from safetensors import safe_open

    with safe_open(str(checkpoint_dir / "weights.safetensors"), "pt") as handle:
        return {name.split(".")[0] for name in handle.keys()}  # noqa: SIM118 - not a dict


def test_resume_after_an_interruption_gives_identical_weights(tmp_path, monkeypatch):
    path = synthetic_dataset(tmp_path)
    config = two_stage_recipe(path)
    train(config, tmp_path / "straight")

    # the 9th forward: stage 2, step 3, after the checkpoint at its step 2
    interrupted_run(monkeypatch, config, tmp_path / "resumed", at_call=9)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000006", "step-0000008"]  # keep 2
    # Checkpoints hold what stages so far trained; the rest is rebuilt from its source and seed.
    assert saved_parts(checkpoints / "step-0000006") == {"connectors"}  # the end of align
    assert saved_parts(checkpoints / "step-0000008") == {"connectors", "llm"}

    # A save killed half-way leaves a .tmp folder, or a folder without all its files: never picked.
    (checkpoints / ".tmp-killed").mkdir()
    (checkpoints / ".tmp-killed" / "weights.safetensors").write_bytes(b"partial")
    (checkpoints / "step-0000011").mkdir()
    (checkpoints / "step-0000011" / "weights.safetensors").write_bytes(b"partial")

    summary = train(config, tmp_path / "resumed", resume=True)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(r)["global_step"] for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard"))
    events.Reload()  # both sessions' events, each step once
    assert [e.step for stage in ("align", "tune") for e in events.Scalars(f"loss/{stage}")] == steps
    assert summary["samples"] == 12 * 4


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from polymodal.train import checkpoint

    path = synthetic_dataset(tmp_path)
    save_file, calls = checkpoint.save_file, []

    def disk_fills(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the weights of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills)
    with pytest.raises(UserError, match=r"could not write checkpoint step-0000004 .*No space left.*"
                                        r"step-0000002 is the newest complete one"):
        train(two_stage_recipe(path), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]  # no .tmp left


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    path = synthetic_dataset(tmp_path)
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(two_stage_recipe(path), tmp_path / "empty", resume=True)


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): the same loss curve as one process on the same global batch."""
    path = synthetic_dataset(tmp_path)  # every sample has 5 answer tokens, so per-rank means average exactly
    ddp, single = ddp_and_single_losses({"name": "ddp", "model": MODEL, "stages": [
        {"name": "tune", "train": ["encoder", "connector", "llm"],
         "lr": {"encoder": 3e-3, "connector": 3e-3, "llm": 3e-3}, "steps": 6, "batch_size": 8,
         "log_every": 1, "data": [{"format": "llava", "path": str(path)}]}]}, tmp_path)
    assert len(ddp) == 6
    assert ddp == pytest.approx(single, rel=1e-3)
    assert ddp[-1] < ddp[0]


def test_two_process_fsdp_matches_one_process_and_saves_the_whole_model(tmp_path):
    """parallel: fsdp shards a copy of the model over 2 CPU processes; the loss curve is the
    single-process one, and the gathered checkpoint and final model hold the same weights."""
    path = synthetic_dataset(tmp_path)
    recipe = {"name": "fsdp", "model": MODEL, "parallel": "fsdp", "checkpoint": {"every": 3, "keep": 1},
              "stages": [{"name": "tune", "train": ["encoder", "connector", "llm"],
                          "lr": {"encoder": 3e-3, "connector": 3e-3, "llm": 3e-3}, "steps": 6, "batch_size": 8,
                          "log_every": 1, "data": [{"format": "llava", "path": str(path)}]}]}
    fsdp, single = ddp_and_single_losses(recipe, tmp_path)
    assert len(fsdp) == 6 and fsdp == pytest.approx(single, rel=1e-3)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["parallel"] == "fsdp" and summary["processes"] == 2
    sharded = MultimodalLM.from_pretrained(tmp_path / "ddp" / "model").state_dict()
    whole = MultimodalLM.from_pretrained(tmp_path / "single" / "model").state_dict()
    assert sharded.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-3, atol=1e-4)


def test_frozen_encoder_features_are_cached_with_the_same_losses(tmp_path):
    path = synthetic_dataset(tmp_path)
    runs = {}
    for cache in (True, False):
        config = recipe(path, ["connector", "llm"], steps=5, cache_features=cache, log_every=1)
        torch.manual_seed(0)  # both runs start from the same connector weights
        model = MultimodalLM.from_config(config)
        calls = []
        model.encoder.register_forward_hook(lambda module, args, out, calls=calls: calls.append(args[0].shape[0]))
        train(config, tmp_path / f"run-{cache}", model)
        rows = (tmp_path / f"run-{cache}" / "metrics.jsonl").read_text().splitlines()
        runs[cache] = ([json.loads(r)["loss"] for r in rows], calls)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert sum(runs[True][1]) == len(WORDS)  # each image encoded once
    assert sum(runs[False][1]) == 5 * 8  # every sample of every step


def test_learning_rate_schedules_warm_up_then_decay_to_near_zero():
    from polymodal.config import DatasetConfig, StageConfig
    from polymodal.train.loop import learning_rate_factor

    def factors(**options):
        stage = StageConfig(name="s", train=["connector"], lr={"connector": 1.0}, steps=10, warmup_ratio=0.2,
                            data=[DatasetConfig(format="easy-vqa")], **options)
        return [round(learning_rate_factor(stage)(step), 3) for step in range(10)]

    cosine = factors()
    decaying = cosine[2:]
    assert cosine[:3] == [0.5, 1.0, 1.0] and decaying == sorted(decaying, reverse=True) and decaying[-1] < 0.05
    # warmup-stable-decay: the peak until the last 30% of steps, then linear to zero
    assert factors(schedule="wsd", decay_ratio=0.3) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.667, 0.333]


def test_lora_plus_gives_the_b_matrices_their_own_rate():
    from polymodal.errors import ConfigError
    from polymodal.objectives.lm import LanguageModeling
    from polymodal.train.loop import make_optimizer

    lora_model = {**MODEL, "llm": {"source": "tiny:llama", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}}
    config = from_dict(RecipeConfig, {"name": "plus", "model": lora_model, "stages": [
        {"name": "tune", "train": ["connector", "llm.lora"], "lr": {"connector": 1e-3, "llm.lora": 2e-4},
         "lora_plus_ratio": 8, "data": [{"format": "easy-vqa"}]}]})
    model = MultimodalLM.from_config(config)
    objective = LanguageModeling(config.stages[0], model)
    objective.set_trainable(model)
    groups = {g["name"]: g for g in make_optimizer(objective, model).param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"connector": 1e-3, "llm.lora": 2e-4, "llm.lora.B": 1.6e-3}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["llm.lora.B"]["params"] and all("lora_B" in names[id(p)] for p in groups["llm.lora.B"]["params"])
    assert all("lora_A" in names[id(p)] for p in groups["llm.lora"]["params"])
    with pytest.raises(ConfigError, match=r"lora_plus_ratio: a positive number, for a stage that trains llm\.lora"):
        from_dict(RecipeConfig, {"name": "x", "model": lora_model, "stages": [
            {"name": "a", "train": ["connector"], "lr": {"connector": 1e-3}, "lora_plus_ratio": 4,
             "data": [{"format": "easy-vqa"}]}]})


def test_a_new_run_can_start_from_a_trained_model_directory(tmp_path):
    from polymodal.build import build_model
    from polymodal.config import load_recipe

    path = synthetic_dataset(tmp_path)
    train(recipe(path, ["connector", "llm"], steps=30), tmp_path / "first")
    stage = {"name": "more", "train": ["connector"], "lr": {"connector": 1e-3}, "steps": 2,
             "batch_size": 8, "log_every": 1, "data": [{"format": "llava", "path": str(path)}]}
    (tmp_path / "again.yaml").write_text(json.dumps(
        {"name": "again", "init_from": str(tmp_path / "first" / "model"), "stages": [stage]}))
    again = load_recipe(tmp_path / "again.yaml")
    trained = MultimodalLM.from_pretrained(tmp_path / "first" / "model").state_dict()
    started = build_model(again).state_dict()
    assert all(torch.equal(trained[name], started[name]) for name in trained)
    train(again, tmp_path / "second")
    first = [json.loads(line)["loss"] for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    second = json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert second < first[0] / 2  # it goes on from the trained weights, not from scratch
    # --set init_from= works as the file's own field; a model beside it is refused
    (tmp_path / "plain.yaml").write_text(json.dumps({"name": "plain", "stages": [stage]}))
    set_on_command_line = load_recipe(tmp_path / "plain.yaml", [f"init_from={tmp_path / 'first' / 'model'}"])
    assert set_on_command_line.model == again.model
    with pytest.raises(UserError, match="leave model out"):
        load_recipe(tmp_path / "again.yaml", ["model.llm.dtype=float32"])
