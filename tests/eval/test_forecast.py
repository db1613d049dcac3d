"""The `forecast` task (issue 19 §1): MASE and sMAPE against hand-computed values, the seasonal
naive forecast, generated answers read as numbers (the unparseable counted and listed), the
head's route, and the plot of forecasts against the truth."""

import math

import numpy as np
import pytest
import torch

from polymodal.config import ModelConfig, from_dict
from polymodal.data.sample import Item
from polymodal.errors import UserError
from polymodal.eval.forecast import Forecast, read_answer
from polymodal.eval.forecast_metrics import (
    mase,
    score_forecasts,
    seasonal_naive,
    seasonal_scale,
    smape,
)
from polymodal.eval.run import evaluate
from polymodal.eval.tasks import TaskOptions
from polymodal.model import MultimodalLM


def test_seasonal_naive_repeats_the_last_season():
    history = [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(seasonal_naive(history, 3, 2), [[5, 6, 5]])
    np.testing.assert_array_equal(seasonal_naive(history, 2, 1), [[6, 6]])
    with pytest.raises(ValueError, match="at least one period"):
        seasonal_naive([1, 2], 3, 12)


def test_mase_and_smape_match_hand_computed_values():
    history = [1, 2, 3, 4, 5, 6]  # seasonal differences (m = 2): 2, 2, 2, 2 -> scale 2
    assert seasonal_scale(history, 2).tolist() == [2.0]
    assert mase([7, 8], [8, 8], history, 2) == pytest.approx(0.25)  # MAE 0.5 / 2
    assert smape([7, 8], [8, 8]) == pytest.approx(100 * (2 * 1 / 15 + 0) / 2)  # 6.667 %
    assert smape([0, 1], [0, -1]) == pytest.approx(100)  # 0/0 is no error; opposite signs 200
    # two channels: each its own scale, then the mean
    two = mase([[7, 8], [0, 0]], [[8, 8], [3, 3]], [[1, 2, 3, 4, 5, 6], [3, 3, 3, 3, 0, 6]], 2)
    assert two == pytest.approx((0.25 + 3 / 1.5) / 2)  # channel 2: |diffs| 0, 3, 3, 0 -> 1.5
    assert math.isnan(mase([1, 1], [1, 1], [5, 5, 5, 5], 2))  # a constant history has no scale


def test_score_forecasts_sets_the_naive_forecast_beside():
    histories = [np.arange(1, 7.0), np.arange(1, 7.0) * 2]
    truths = [np.array([8.0, 8.0]), np.array([14.0, 16.0])]
    forecasts = [np.array([7.0, 8.0]), np.array([14.0, 16.0])]
    results = score_forecasts(forecasts, truths, histories, 2)
    assert results["mase"] == pytest.approx((0.25 + 0) / 2)
    # naive: [5, 6] vs [8, 8] -> MAE 2.5 / 2; [10, 12] vs [14, 16] -> 4 / 4
    assert results["seasonal_naive"]["mase"] == pytest.approx((1.25 + 1) / 2)
    assert results["windows"] == 2 and results["undefined"] == 0


@pytest.mark.parametrize("text, channels, expected", [
    ("112 118 132", 1, [[112, 118, 132]]),
    ("The next values are 112, 118 and 132.5.", 1, [[112, 118, 132.5]]),
    ("1.5,3.0 1.7,2.9", 2, [[1.5, 1.7], [3.0, 2.9]]),  # time first, a step's channels by commas
    ("1.5,3.0 1.7", 2, [[1.5], [3.0]]),  # a last incomplete step is dropped
    ("no idea", 1, None),
    ("4", 2, None),
])
def test_a_generated_answer_is_read_as_values(text, channels, expected):
    values = read_answer(text, channels)
    assert (values is None) if expected is None else values.tolist() == expected


def windows(folder, count: int = 3) -> list[Item]:
    """Airline-like windows: 24 steps of a trend with a 12-step season, the next 4 as the truth."""
    items = []
    for index in range(count):
        steps = np.arange(28) + 5 * index
        values = 100 + 2 * steps + 10 * np.sin(2 * np.pi * steps / 12)
        path = folder / f"w{index}.npy"
        np.save(path, values[:24].astype(np.float32))
        future = values[24:].round(1).tolist()
        items.append(Item(f"w{index}", "What are the next 4 values?", [], [" ".join(f"{v:.1f}" for v in future)],
                          {"type": "forecast", "future": future, "horizon": 4, "decimals": 1, "season": 12},
                          media={"series": [str(path)]}))
    return items


def test_text_answers_are_scored_and_the_unparseable_counted_and_listed(tmp_path):
    items = windows(tmp_path)
    answers = [items[0].references[0], "I think it goes up", "1 2 3 4 5"]  # exact, unparseable, far off
    results, rows = Forecast().score(items, answers)
    assert results["method"] == "text" and results["unparseable"] == 1 and results["windows"] == 2
    assert [row["parsed"] for row in rows] == [True, False, True]
    assert rows[0]["mase"] == pytest.approx(0.0, abs=1e-6) and rows[0]["correct"]
    assert rows[2]["forecast"] == [[1, 2, 3, 4]] and not rows[2]["correct"]  # 5th value cut: horizon 4
    history = np.load(items[2].media["series"][0])
    truth = items[2].info["future"]
    assert results["mase"] == pytest.approx((0 + mase([1, 2, 3, 4], truth, history, 12)) / 2)
    assert results["smape"] == pytest.approx((smape(truth, truth) + smape([1, 2, 3, 4], truth)) / 2)
    naive = [mase(seasonal_naive(np.load(items[i].media["series"][0]), 4, 12), items[i].info["future"],
                  np.load(items[i].media["series"][0]), 12) for i in (0, 2)]
    assert results["seasonal_naive"]["mase"] == pytest.approx(sum(naive) / 2)
    assert Forecast().score(items[1:2], ["nothing"])[0]["mase"] is None  # no number made up


def forecaster() -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "encoders": {"series": {"kind": "patchtst", "channels": 1, "length": 24}},
        "connectors": {"series": {"kind": "mlp"}}, "forecast_head": {"horizon": 4}})).eval()


def test_a_model_with_a_head_is_scored_by_its_head_and_the_forecasts_are_plotted(tmp_path):
    items = windows(tmp_path)
    results, rows = evaluate(forecaster(), "forecast", TaskOptions(data="unused"), out=tmp_path / "out", items=items)
    assert results["task"] == "forecast" and results["method"] == "head" and results["unparseable"] == 0
    # a fresh head (zero) forecasts each context's mean
    for item, row in zip(items, rows):
        mean = float(np.load(item.media["series"][0]).mean())
        np.testing.assert_allclose(row["forecast"], [[mean] * 4], rtol=1e-5)
    assert (tmp_path / "out" / "forecasts.png").stat().st_size > 1000
    assert (tmp_path / "out" / "predictions.jsonl").read_text().count('"parsed": true') == 3
    assert results["cropped"] == 0


def test_a_context_longer_than_the_encoder_is_forecast_from_its_last_steps(tmp_path):
    item = windows(tmp_path, 1)[0]
    np.save(item.media["series"][0], np.arange(30, dtype=np.float32))  # the encoder's length is 24
    results, rows = evaluate(forecaster(), "forecast", TaskOptions(data="unused"), items=[item])
    assert results["cropped"] == 1
    np.testing.assert_allclose(rows[0]["forecast"], [[np.arange(6, 30).mean()] * 4], rtol=1e-5)  # a fresh head: the mean


def test_setting_head_needs_a_head_and_text_forces_generation(tmp_path):
    items = windows(tmp_path, 1)
    plain = MultimodalLM(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "encoders": {"series": {"kind": "patchtst", "channels": 1, "length": 24}},
        "connectors": {"series": {"kind": "mlp"}}})).eval()
    with pytest.raises(UserError, match="no forecast head"):
        Forecast().run(plain, TaskOptions(setting="head"), 8, items)
    results, rows = Forecast().run(forecaster(), TaskOptions(setting="text", max_new_tokens=4), 8, items)
    assert results["method"] == "text" and len(rows) == 1  # a random tiny LLM: whatever it says is scored
    with pytest.raises(UserError, match="--setting random: task forecast takes all, head, text"):
        Forecast().items(TaskOptions(data="aeon:airline", setting="random"))


def test_info_shows_a_forecast_head_with_its_horizon_and_parameters(tmp_path, capsys):
    from polymodal.cli.info import parts_table
    from polymodal.cli.main import main

    model = forecaster()
    head = model.forecast_head
    expected = head.tokens * model.llm.hidden_size * 1 * 4 + 1 * 4  # K * D * C * H weights + C * H biases
    assert sum(p.numel() for p in head.parameters()) == expected
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("forecast_head")]
    assert len(rows) == 1 and rows[0][1:5] == ["linear", "on", "series,", "horizon"] and rows[0][5] == "4"
    assert rows[0][7] == f"{expected:,}"  # params, after the source column's "-"
    plain = MultimodalLM(from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama"}, "encoders": {"series": {"kind": "patchtst", "channels": 1, "length": 24}},
        "connectors": {"series": {"kind": "mlp"}}}))
    assert "forecast_head" not in parts_table(plain)
