"""`objective: forecast` and the forecast head (issue 19 §1 forecasting): the head's shapes, the
exact way back from its normalised space, the loss falling on a synthetic sine, and a model
with a head saved and loaded (one without is unchanged)."""

import numpy as np
import pytest
import torch

from polymodal.config import ModelConfig, StageConfig, from_dict
from polymodal.data.sample import Sample
from polymodal.data.series_records import format_values
from polymodal.errors import ConfigError, UserError
from polymodal.heads import ForecastHead
from polymodal.model import MultimodalLM
from polymodal.objectives.forecast import Forecasting, head_forecasts

HORIZON, LENGTH, PERIOD = 8, 32, 8
QUESTION = "<series>\nWhat are the next 8 values?"


def forecaster(channels: int = 1, horizon: int = HORIZON) -> MultimodalLM:
    """tiny:llama with a patchtst encoder, an MLP connector and a forecast head."""
    torch.manual_seed(0)
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"},
                                     "encoders": {"series": {"kind": "patchtst", "channels": channels,
                                                             "length": LENGTH}},
                                     "connectors": {"series": {"kind": "mlp"}},
                                     "forecast_head": {"horizon": horizon}})
    return MultimodalLM(config)


def stage(**options) -> StageConfig:
    parts = ["encoder", "connector", "forecast_head"]
    return from_dict(StageConfig, {"name": "forecast", "objective": "forecast", "train": parts,
                                   "lr": dict.fromkeys(parts, 3e-3), "data": [{"format": "easy-vqa"}],
                                   "batch_size": 8, **options})


def sines(folder, count: int, seed: int = 0) -> list[Sample]:
    """Sines of period 8 at random phases, levels and amplitudes: 32 steps of context in a
    .npy file, the next 8 as the answer."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        phase, level, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(-50, 50), rng.uniform(0.5, 20)
        values = level + amplitude * np.sin(2 * np.pi * np.arange(LENGTH + HORIZON) / PERIOD + phase)
        path = folder / f"sine{index}.npy"
        np.save(path, values[:LENGTH].astype(np.float32))
        samples.append(Sample(f"sine{index}", [{"role": "user", "content": QUESTION},
                                               {"role": "assistant", "content": format_values(values[LENGTH:], 3)}],
                              media={"series": [str(path)]}))
    return samples


def test_the_head_maps_k_tokens_to_channels_by_horizon_and_starts_at_zero():
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}}).forecast_head
    assert config is None  # no head unless asked for
    head = ForecastHead(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "encoders": {"series": {"kind": "patchtst", "channels": 3, "length": 32}},
        "connectors": {"series": {"kind": "mlp"}}, "forecast_head": {"horizon": 5}}).forecast_head,
        tokens=4, hidden_size=16, channels=3)
    hidden = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:6] = mask[1, 5:9] = True
    values = head(hidden, mask)
    assert values.shape == (2, 3, 5)
    assert torch.equal(values, torch.zeros(2, 3, 5))  # zero-initialised: the context's mean
    mask[1, 4] = True  # 5 tokens in row 1
    with pytest.raises(RuntimeError, match="4 tokens"):
        head(hidden, mask)


def test_a_head_reads_an_encoded_modality():
    with pytest.raises(ConfigError, match=r"forecast_head\.modality: the model has no series encoder"):
        from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "forecast_head": {"horizon": 4}})
    with pytest.raises(ConfigError, match="horizon: must be at least 1"):
        from_dict(ModelConfig, {"llm": {"source": "tiny:llama"}, "forecast_head": {"horizon": 0}})


def test_denormalisation_inverts_the_objectives_target_exactly(tmp_path):
    model = forecaster()
    objective = Forecasting(stage(), model)
    [sample] = sines(tmp_path, 1)
    batch = objective.batch([objective.example(sample, {})])
    statistics = model.encoders["series"].statistics(batch.series)
    target = (batch.future - statistics.mean) / statistics.std  # what the loss compares with, [1, 1, 8]
    with torch.no_grad():  # a head that answers exactly the target, whatever it reads
        model.forecast_head.linear.bias.copy_(target.flatten())
    assert objective.loss(model, batch).loss.item() == pytest.approx(0.0, abs=1e-10)
    [forecast] = head_forecasts(model, [(sample.messages[:1], sample.media["series"][0])])
    assert forecast.shape == (1, HORIZON)
    np.testing.assert_allclose(forecast, batch.future[0].double().numpy(), rtol=1e-6, atol=1e-4)


def test_the_loss_falls_on_a_synthetic_sine(tmp_path):
    model = forecaster()
    objective = Forecasting(stage(), model)
    memo = {}
    examples = [objective.example(sample, memo) for sample in sines(tmp_path, 32)]
    assert len(examples[0]["input_ids"]) < len(model.processor.encode_for_training(
        sines(tmp_path, 1)[0].messages, load_images=False, media={"series": [None]})["input_ids"])  # cut after the series
    objective.set_trainable(model)
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == {
        "encoders", "connectors", "forecast_head"}  # the LLM stays frozen
    optimizer = torch.optim.AdamW([p for group in objective.parameter_groups(model) for p in group["params"]], lr=3e-3)
    model.train()
    losses = []
    for step in range(40):
        loss = objective.loss(model, objective.batch(examples[(step % 4) * 8 : (step % 4) * 8 + 8])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[:4]) > 0.5  # the zero head's first loss: the normalised future's variance
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:4])


def test_an_answer_of_the_wrong_length_is_a_listed_sample_and_a_sample_without_a_series_is_skipped(tmp_path):
    objective = Forecasting(stage(), forecaster())
    [sample] = sines(tmp_path, 1)
    sample.messages[1]["content"] = "1 2 3"
    with pytest.raises(UserError, match="its answer holds 3 values; the forecast head predicts 8 steps"):
        objective.example(sample, {})
    assert objective.example(Sample("text", [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "1 2"}]), {}) is None


def test_the_objective_needs_a_model_with_a_head_and_refuses_lm_options():
    model = MultimodalLM(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "encoders": {"series": {"kind": "patchtst", "channels": 1, "length": 32}},
        "connectors": {"series": {"kind": "mlp"}}}))
    with pytest.raises(UserError, match=r"model\.forecast_head"):
        Forecasting(stage(train=["encoder"], lr={"encoder": 1e-3}), model)
    with pytest.raises(UserError, match="unknown trainable part 'forecast_head'"):
        model.set_trainable(["forecast_head"])
    with pytest.raises(ConfigError, match="share_prefix: only for objective lm"):
        stage(share_prefix=4)


def test_a_model_with_a_head_saves_and_loads_it(tmp_path):
    model = forecaster(channels=2, horizon=3)
    with torch.no_grad():
        model.forecast_head.linear.weight.normal_()
    model.save_pretrained(tmp_path / "model")
    loaded = MultimodalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.forecast_head.horizon == 3
    assert torch.equal(loaded.forecast_head.linear.weight, model.forecast_head.linear.weight)
    assert loaded.forecast_head.linear.weight.shape == (2 * 3, model.connectors["series"].num_tokens * 64)


def test_a_recipe_trains_a_head_end_to_end_and_eval_uses_it(tmp_path):
    """A series manifest of sines -> `train` (sizes from the data, objective forecast) -> the
    saved model's head answers the forecast task, better than its fresh zero head."""
    import json

    from polymodal.build import load_any
    from polymodal.config import RecipeConfig
    from polymodal.eval.run import evaluate
    from polymodal.eval.tasks import TaskOptions
    from polymodal.train.run import train

    lines = []
    for sample in sines(tmp_path, 24):
        future = [float(value) for value in sample.messages[1]["content"].split()]
        lines.append(json.dumps({"series": sample.media["series"][0], "future": future}))
    (tmp_path / "sines.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[16:]) + "\n")
    parts = ["encoder", "connector", "forecast_head"]
    recipe = from_dict(RecipeConfig, {
        "name": "sines", "model": {
            "llm": {"source": "tiny:llama"}, "forecast_head": {"horizon": HORIZON},
            "encoders": {"series": {"kind": "patchtst", "channels": 0, "length": 0}},
            "connectors": {"series": {"kind": "mlp"}}},
        "stages": [{"name": "forecast", "objective": "forecast", "train": parts, "lr": dict.fromkeys(parts, 3e-3),
                    "steps": 30, "batch_size": 8, "data": [{"format": "series", "path": str(tmp_path / "sines.jsonl")}]}]})
    summary = train(recipe, tmp_path / "run")
    assert summary["stages"]["forecast"]["series"] == 30 * 8
    model = load_any(str(tmp_path / "run" / "model"))
    assert (model.config.encoders["series"].channels, model.config.encoders["series"].length) == (1, LENGTH)
    options = TaskOptions(data=str(tmp_path / "test.jsonl"))
    trained, _ = evaluate(model, "forecast", options)
    with torch.no_grad():
        model.forecast_head.linear.weight.zero_()
        model.forecast_head.linear.bias.zero_()
    fresh, _ = evaluate(model, "forecast", options)  # the context's mean
    assert trained["method"] == "head" and trained["windows"] == 8
    assert trained["mase"] < 0.5 * fresh["mase"]  # measured: 0.15 vs 1.32
