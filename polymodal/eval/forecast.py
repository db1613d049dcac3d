"""`forecast`: a series' next values, scored by MASE and sMAPE against the truth and read
beside the seasonal naive forecast's scores on the same windows (eval/forecast_metrics.py).

The values come from the model's forecast head when it has one (`model.forecast_head`,
trained by `objective: forecast`), else from its answer: the generated text read as numbers
(`parse_values`, the format `format_values` writes). An answer that gives fewer than the
horizon's values is unparseable: counted, listed in predictions.jsonl, left out of the means.
`--setting head` or `--setting text` picks the route (`all`, the default: the head if any).

The data (`--data`): `aeon:NAME`, a forecasting series aeon bundles (airline, lynx,
shampoo; its test windows, data/aeon.py), or a series task file (the `series` format's
JSONL manifest of {"series": FILE, "future": ...}). The seasonal period m of MASE is the
set's own (`info["season"]`: airline 12, lynx 10; data/aeon.py), else 1 (the naive forecast).

Example:
    results, rows = evaluate(model, "forecast", TaskOptions(data="aeon:airline"))
    results["mase"], results["seasonal_naive"]["mase"]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from polymodal.data.series_records import parse_values
from polymodal.errors import UserError
from polymodal.eval.forecast_metrics import mase, score_forecasts, seasonal_naive, smape
from polymodal.eval.report import prediction_row
from polymodal.eval.series_inputs import count_cropped
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    named_dataset,
    register_task,
    seeded_sample,
    task_dataset,
)
from polymodal.processing.series import read_series

SETTINGS = ("all", "head", "text")


@register_task("forecast")
class Forecast(Task):
    """The next values of a series: MASE and sMAPE, the seasonal naive forecast's beside them."""

    headline = "mase"

    def items(self, options: TaskOptions) -> list[Item]:
        if not options.data:
            raise UserError("task forecast needs --data: aeon:NAME (a forecasting series aeon bundles; its "
                            "test windows) or a series file (the series format's JSONL manifest)")
        if options.setting not in SETTINGS:
            raise UserError(f"--setting {options.setting}: task forecast takes {', '.join(SETTINGS)}")
        dataset = options if named_dataset(options.data) else replace(options, dataset="series")
        items = [item for item in task_dataset(dataset).question_items() if item.info.get("type") == "forecast"]
        if not items:
            raise UserError(f"--data {options.data}: holds no forecasting windows (labelled series are "
                            f"evaluated by --task series-classification)")
        return seeded_sample(items, options.limit, options.seed)

    def run(self, model, options: TaskOptions, batch_size: int,
            items: list[Item] | None = None) -> tuple[dict, list[dict]]:
        items = self.items(options) if items is None else items
        if not items:
            raise UserError("task forecast: the data holds no windows")
        results, rows = self.answer(model, options, batch_size, items)
        return {**results, "cropped": count_cropped(model, items, self.name)}, rows

    def answer(self, model, options: TaskOptions, batch_size: int, items: list[Item]) -> tuple[dict, list[dict]]:
        """(metrics, rows) by the head or the text route (`options.setting`)."""
        head = getattr(model, "forecast_head", None)
        if options.setting == "head" and head is None:
            raise UserError("--setting head: this model has no forecast head (train one with objective forecast)")
        if head is not None and options.setting != "text":
            from polymodal.objectives.forecast import head_forecasts

            prompts = [(item.prompt(model.image_placeholder)["messages"], item.media[head.config.modality][0])
                       for item in items]
            forecasts = head_forecasts(model, prompts, batch_size, system=options.system)
            return self.score_values(items, forecasts, [format_rows(values) for values in forecasts], "head")
        return super().run(model, replace(options, max_new_tokens=self.answer_tokens(model, items, options)),
                           batch_size, items)

    def answer_tokens(self, model, items: list[Item], options: TaskOptions) -> int:
        """The user's --max-new-tokens, or room for the longest reference answer and a third more."""
        if options.max_new_tokens:
            return options.max_new_tokens
        tokenizer = model.llm.tokenizer
        longest = max(len(tokenizer(item.references[0], add_special_tokens=False)["input_ids"]) for item in items)
        return longest + longest // 3 + 4

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        """Generated answers, read as values (None where fewer than the truth's), then scored."""
        forecasts = [read_answer(text, truth_of(item).shape[0]) for item, text in zip(items, predictions)]
        return self.score_values(items, forecasts, predictions, "text")

    def score_values(self, items: list[Item], forecasts: list, texts: list[str], method: str) -> tuple[dict, list[dict]]:
        """Forecasts ([C, >= H] arrays, None where the answer gave none) -> (metrics, rows)."""
        rows, kept = [], []
        for item, forecast, text in zip(items, forecasts, texts):
            truth = truth_of(item)  # [C, H]
            history = read_series(item.media["series"][0]).numpy()  # [C, T]
            period = int(item.info.get("season") or 1)
            forecast = fitted(forecast, truth)
            row = prediction_row(item, text.strip(), False, reference=item.references[0])
            row.update(series=item.media["series"][0], parsed=forecast is not None, naive_mase=mase(seasonal_naive(history, truth.shape[1], period),
                                                                    truth, history, period))
            if forecast is not None:
                row.update(mase=mase(forecast, truth, history, period), smape=smape(forecast, truth),
                           forecast=forecast.tolist())
                row["correct"] = bool(row["mase"] <= row["naive_mase"])  # at least as good as last season
                kept.append((forecast, truth, history, period))
            rows.append(row)
        results = {"method": method, "unparseable": sum(not row["parsed"] for row in rows)}
        if kept:
            results.update(score_forecasts(*(list(part) for part in zip(*kept))))
        else:  # nothing to average: no number rather than a made-up one
            results.update(mase=None, smape=None, windows=0)
        results["beats_naive"] = sum(row["correct"] for row in rows) / len(rows)
        return results, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        def shown(value) -> str:
            return "-" if value is None else f"{value:.3f}"

        naive = results.get("seasonal_naive", {}).get("mase")
        plot_forecasts(rows, out / "forecasts.png", f"forecast ({results['method']}): MASE "
                       f"{shown(results['mase'])}, seasonal naive {shown(naive)}")


def plot_forecasts(rows: list[dict], out: Path, title: str, windows: int = 6) -> None:
    """Up to `windows` windows side by side (the first channel): the context, the true future,
    the forecast and the seasonal naive forecast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:windows]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 2.8), squeeze=False)
    for axis, row in zip(axes[0], shown):
        history = read_series(row["series"]).numpy()[0]  # [T]
        truth = np.asarray(row["future"], dtype=np.float64).reshape(len(row["future"]), -1)[:, 0]  # [H]
        steps = np.arange(len(history), len(history) + len(truth))
        axis.plot(np.arange(len(history)), history, color="0.4", linewidth=1, label="context")
        axis.plot(steps, truth, color="black", linewidth=1.5, label="truth")
        naive = seasonal_naive(history, len(truth), min(int(row.get("season") or 1), len(history)))[0]
        axis.plot(steps, naive, color="tab:gray", linestyle="--", linewidth=1, label="seasonal naive")
        if row.get("forecast") is not None:
            axis.plot(steps, row["forecast"][0], color="tab:red", linewidth=1.5, label="forecast")
        else:
            axis.text(0.5, 0.9, "unparseable", transform=axis.transAxes, ha="center", color="tab:red")
        axis.set_title(str(row["id"]), fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def truth_of(item: Item) -> np.ndarray:
    """An item's true future [C, H] (its info's [H] or [H][C] values)."""
    future = np.asarray(item.info["future"], dtype=np.float64)
    return future[None] if future.ndim == 1 else future.T


def read_answer(text: str, channels: int) -> np.ndarray | None:
    """A generated answer -> its values [channels, steps] (time first as written: a step's
    channels follow one another), a last incomplete step dropped; None without a full step."""
    values = parse_values(text)
    steps = len(values) // channels
    if not steps:
        return None
    return np.asarray(values[: steps * channels], dtype=np.float64).reshape(steps, channels).T


def fitted(forecast, truth: np.ndarray) -> np.ndarray | None:
    """A forecast cut to the truth's channels and horizon; None when it has fewer values."""
    if forecast is None:
        return None
    forecast = np.asarray(forecast, dtype=np.float64)
    if forecast.ndim == 1:
        forecast = forecast[None]
    channels, horizon = truth.shape
    if forecast.shape[0] < channels or forecast.shape[1] < horizon:
        return None
    return forecast[:channels, :horizon]


def format_rows(values: np.ndarray) -> str:
    """A head's forecast [C, H] as text for predictions.jsonl (4 significant digits)."""
    return "; ".join(" ".join(f"{value:.4g}" for value in channel) for channel in values)
