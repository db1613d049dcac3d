"""Point-forecast accuracy: MASE and sMAPE, and the seasonal naive forecast they are read against.

MASE (Hyndman & Koehler 2006, "Another look at measures of forecast accuracy", IJF 22(4)):
the forecast's mean absolute error divided by the in-sample mean absolute error of the
seasonal naive forecast, y_t - y_{t-m}, over the series the forecast was made from (here each
window's context, as the M4 competition and GluonTS compute it). Below 1: better than
repeating last season, in-sample; the seasonal naive forecast itself usually scores near 1
out of sample. sMAPE as the M4 competition defines it: 200/H * sum |F - Y| / (|F| + |Y|),
in percent (0 to 200).

Arrays are channels first, as series are everywhere in polymodal: history [C, T], forecast
and truth [C, H]; a 1-D array is one channel. Several channels: each channel's MASE, then
their mean.

Example:
    history = read_series("window.npy").numpy()  # [1, 36]
    naive = seasonal_naive(history, horizon=12, period=12)  # [1, 12]
    mase(naive, truth, history, period=12), smape(naive, truth)
"""

from __future__ import annotations

import math

import numpy as np


def _channels(values) -> np.ndarray:
    """Any array-like of [T] or [C, T] -> float64 [C, T]."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"expected [T] or [C, T] values, got shape {array.shape}")
    return array


def seasonal_naive(history, horizon: int, period: int) -> np.ndarray:
    """The last observed season repeated: forecast[h] = history[T - m + (h mod m)].

    Args:
        history: [T] or [C, T], at least `period` steps.
        horizon: H, steps to forecast.
        period: m, the seasonal period (12 for monthly data with a yearly season; 1: the
            last value repeated, the plain naive forecast).

    Returns:
        [C, H] float64.

    Raises:
        ValueError: a history shorter than one period, or a period below 1.
    """
    history = _channels(history)
    if period < 1 or history.shape[1] < period:
        raise ValueError(f"seasonal naive needs period >= 1 and at least one period of history "
                         f"(period {period}, {history.shape[1]} steps)")
    season = history[:, -period:]  # [C, m]
    return season[:, np.arange(horizon) % period]


def seasonal_scale(history, period: int) -> np.ndarray:
    """[C]: each channel's in-sample mean |y_t - y_{t-m}| (MASE's denominator). A history
    of at most `period` steps has none: the plain naive one (m = 1) is used instead."""
    history = _channels(history)
    lag = period if history.shape[1] > period else 1
    if history.shape[1] <= lag:
        raise ValueError(f"MASE needs at least {lag + 1} steps of history, got {history.shape[1]}")
    return np.abs(history[:, lag:] - history[:, :-lag]).mean(axis=1)


def mase(forecast, truth, history, period: int) -> float:
    """Mean absolute scaled error of one forecast (Hyndman & Koehler 2006).

    Args:
        forecast, truth: [H] or [C, H].
        history: [T] or [C, T], what the forecast was made from (its scale).
        period: the seasonal period m of the scale.

    Returns:
        The mean over channels of MAE / scale; NaN when a channel's history is constant
        (a scale of 0: MASE is undefined there).
    """
    forecast, truth = _channels(forecast), _channels(truth)
    scale = seasonal_scale(history, period)  # [C]
    errors = np.abs(forecast - truth).mean(axis=1)  # [C]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(scale > 0, errors / np.where(scale > 0, scale, 1), np.nan)
    return float(scaled.mean())


def smape(forecast, truth) -> float:
    """Symmetric mean absolute percentage error in percent, 0 to 200 (M4's definition);
    a step where forecast and truth are both 0 counts as no error."""
    forecast, truth = _channels(forecast), _channels(truth)
    denominator = np.abs(forecast) + np.abs(truth)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(denominator > 0, 2 * np.abs(forecast - truth) / np.where(denominator > 0, denominator, 1), 0)
    return float(100 * terms.mean())


def score_forecasts(forecasts: list, truths: list, histories: list, periods: int | list[int]) -> dict:
    """Mean MASE and sMAPE over forecasts, and the seasonal naive forecast's on the same windows.

    The function the study (benchmarks/series_llm.py) calls for its forecasting row.

    Args:
        forecasts, truths: one [H] or [C, H] array each per window.
        histories: each window's context [T] or [C, T].
        periods: the seasonal period m (airline: 12), or one per window.

    Returns:
        {"mase", "smape", "seasonal_naive": {"mase", "smape"}, "windows", "undefined"}:
        "undefined" counts windows whose MASE has no scale (constant history), left out of
        the means.
    """
    if not forecasts:
        raise ValueError("no forecasts to score")
    periods = [periods] * len(forecasts) if isinstance(periods, int) else list(periods)
    windows = list(zip(forecasts, truths, histories, periods))
    naive = [seasonal_naive(h, _channels(t).shape[1], m) for _, t, h, m in windows]
    scores = [mase(f, t, h, m) for f, t, h, m in windows]
    return {"mase": _mean(scores), "smape": _mean([smape(f, t) for f, t, _, _ in windows]),
            "seasonal_naive": {"mase": _mean([mase(n, t, h, m) for n, (_, t, h, m) in zip(naive, windows)]),
                               "smape": _mean([smape(n, t) for n, (_, t, _, _) in zip(naive, windows)])},
            "windows": len(windows), "undefined": sum(math.isnan(score) for score in scores)}


def _mean(values: list[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan
