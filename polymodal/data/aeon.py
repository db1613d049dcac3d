"""`format: aeon`: the time series sets that ship inside the `aeon` package, by name.

    {format: aeon, name: BasicMotions, split: train}

Nothing is downloaded: only the copies bundled in `aeon/datasets/data/` are read (a name
aeon does not bundle is a UserError listing those it does).

- Classification sets (BasicMotions: 6-channel smartwatch accelerometer and gyroscope,
  labels standing/running/walking/badminton; PickupGestureWiimoteZ, GunPoint, ...): their
  `_TRAIN.ts` / `_TEST.ts` file read by the `series` format's .ts reader (aeon's
  `load_from_ts_file`, which `aeon.datasets.load_classification` calls for a bundled set),
  each series written once as `.npy` under the cache. The answer is the label as aeon gives
  it; the question "What activity is this?" for BasicMotions, else "Which class is this
  series?" (`question` overrides).
- Forecasting series (Airline, Lynx, ShampooSales, solar): cut into windows of `context`
  steps -> the next `horizon` steps. The split is by time: windows whose future lies in the
  last `test_fraction` of the series are `test`, those whose future ends before it `train`.
  The answer is the future as text (`format_values`, decimals fixed per series).

The options are also an `EvaluationData`: `--data aeon:NAME` of the series eval tasks.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from polymodal.config import DatasetConfig
from polymodal.data.evaluation import EvaluationData
from polymodal.data.sample import Item, Sample
from polymodal.data.series import check_series_options, ts_records, usable_items
from polymodal.data.series_records import (
    CLASS_QUESTION,
    DEFAULT_MAX_LENGTH,
    FORECAST_QUESTION,
    SeriesRecord,
    array_problem,
    choose_decimals,
    series_cache,
    write_series,
)
from polymodal.errors import ConfigError, UserError
from polymodal.registry import register_dataset_format

QUESTIONS = {"BasicMotions": "What activity is this?"}


@dataclass(frozen=True)
class ForecastSet:
    """A bundled forecasting series: its CSV (values in the last column) and its defaults."""

    file: str  # under aeon/datasets/data/
    season: int  # the seasonal period in steps (MASE's naive forecast)
    horizon: int
    context: int


FORECASTING = {
    "Airline": ForecastSet("Airline/Airline.csv", season=12, horizon=12, context=36),  # monthly, 144
    "Lynx": ForecastSet("Lynx/Lynx.csv", season=10, horizon=10, context=30),  # annual, 114; ~10-year cycle
    "ShampooSales": ForecastSet("ShampooSales/ShampooSales.csv", season=12, horizon=6, context=12),  # monthly, 36
    "solar": ForecastSet("solar/solar.csv", season=48, horizon=24, context=96),  # half-hourly, 289
}


@dataclass
class AeonOptions(DatasetConfig, EvaluationData):
    """A set aeon bundles, by `name`, at `split`; forecasting windows of `context` -> `horizon`
    steps (None: the series' defaults in FORECASTING)."""

    format: str = "aeon"
    name: str = ""  # BasicMotions, PickupGestureWiimoteZ, Airline, ... (also what messages call it)
    split: Literal["train", "test"] = "train"
    question: str | None = None  # None: the set's own (QUESTIONS), else a generic one
    max_length: int = DEFAULT_MAX_LENGTH  # longer series are bad samples
    context: int | None = None
    horizon: int | None = None
    test_fraction: float = 0.2  # forecasting: the last part of the series held out
    decimals: int | None = None  # forecasting answers; None: chosen from the training values

    def __post_init__(self):
        super().__post_init__()
        if not self.name:
            raise ConfigError(f"name: required for format aeon (one of the sets aeon bundles: "
                              f"{', '.join(bundled_names())})")
        check_series_options(self)
        for field_name in ("context", "horizon"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ConfigError(f"{field_name}: must be at least 1, got {value}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction: must be between 0 and 1, got {self.test_fraction}")

    @classmethod
    def for_evaluation(cls, split: str, folder: str | None) -> AeonOptions:
        """The set named `folder` (`--data aeon:NAME` passes the name) at `split`."""
        if split not in ("train", "test"):
            raise UserError(f"--split {split}: aeon's sets have train and test")
        return cls(format="aeon", name=folder or "", split=split)

    def records(self) -> list[SeriesRecord]:
        kind, name = resolve_name(self.name)
        if kind == "forecasting":
            return forecast_records(name, self)
        question = self.question or QUESTIONS.get(name, CLASS_QUESTION)
        return ts_records(aeon_data() / name / f"{name}_{self.split.upper()}.ts", question, self.max_length)

    def question_items(self) -> list[Item]:
        return usable_items(self.records(), f"aeon:{self.name}/{self.split}")


@register_dataset_format("aeon", config=AeonOptions)
def read_aeon(options: AeonOptions) -> list[Sample]:
    """A classification set or a forecasting series that aeon bundles, by name."""
    return [record.sample() for record in options.records()]


# ---------------------------------------------------------------- the bundled sets


def aeon_data() -> Path:
    """aeon's folder of bundled sets (found without importing aeon, which takes seconds)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("format aeon needs the aeon package (pip install aeon)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def aeon_version() -> str:
    """The installed aeon's version: windows cut from another release's copy are not reused."""
    try:
        return importlib.metadata.version("aeon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def classification_names() -> tuple[str, ...]:
    """The bundled sets with train and test .ts files whose header declares class labels."""
    root = aeon_data()
    return tuple(sorted(folder.name for folder in root.iterdir()
                        if (folder / f"{folder.name}_TEST.ts").is_file()
                        and _declares_class_labels(folder / f"{folder.name}_TRAIN.ts")))


def _declares_class_labels(path: Path) -> bool:
    """Whether a .ts header says `@classLabel true` (regression sets say @targetLabel)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.strip().lower().split()
                if words[:1] == ["@data"]:
                    return False
                if words[:2] == ["@classlabel", "true"]:
                    return True
    except OSError:
        return False
    return False


def bundled_names() -> list[str]:
    return [*classification_names(), *FORECASTING]


def resolve_name(name: str) -> tuple[str, str]:
    """("classification" | "forecasting", the set's own spelling) for a name in any case.
    Raises UserError listing the bundled sets for a name aeon does not bundle."""
    for kind, names in (("classification", classification_names()), ("forecasting", FORECASTING)):
        for known in names:
            if known.lower() == name.lower():
                return kind, known
    if (aeon_data() / name / f"{name}_TRAIN.ts").is_file():
        raise UserError(f"aeon set {name!r} is a regression set (numeric targets); format aeon reads "
                        f"classification sets ({', '.join(classification_names())}) and forecasting "
                        f"series ({', '.join(FORECASTING)})")
    raise UserError(f"aeon set {name!r} is not bundled with aeon (nothing is downloaded); bundled: "
                    f"classification {', '.join(classification_names())}; forecasting "
                    f"{', '.join(FORECASTING)}")


# ---------------------------------------------------------------- forecasting windows


def forecast_values(name: str) -> np.ndarray:
    """A bundled forecasting series' values [N] (the CSV's last column, after its header)."""
    path = aeon_data() / FORECASTING[name].file
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))[1:]
        return np.array([float(row[-1]) for row in rows if row], dtype=np.float64)
    except (OSError, ValueError, IndexError) as error:
        raise UserError(f"{path}: cannot read aeon's {name} series ({error})") from None


def forecast_records(name: str, options: AeonOptions) -> list[SeriesRecord]:
    """The split's windows: `context` steps written as a `.npy` file, the next `horizon`
    steps the answer. Test windows' futures start in the last `test_fraction` of the series;
    train windows' futures end before it. Raises ConfigError when the split has no window."""
    known = FORECASTING[name]
    context, horizon = options.context or known.context, options.horizon or known.horizon
    values = forecast_values(name)
    test_start = len(values) - max(horizon, math.ceil(options.test_fraction * len(values)))
    if options.split == "train":
        starts = range(context, test_start - horizon + 1)
    else:
        starts = range(max(context, test_start), len(values) - horizon + 1)
    if not starts:
        raise ConfigError(f"context {context} + horizon {horizon} leave no {options.split} window in "
                          f"aeon's {name} ({len(values)} steps, the last {len(values) - test_start} held out)")
    decimals = options.decimals if options.decimals is not None else choose_decimals(values[:test_start])
    question = options.question or FORECAST_QUESTION.format(horizon=horizon)
    folder = series_cache() / "aeon" / aeon_version() / name / f"context-{context}"
    records = []
    for start in starts:
        window = values[None, start - context : start]  # [1, context]
        path = write_series(window, folder / f"{start:05d}.npy")
        records.append(SeriesRecord(f"{name}:{start}", path, question, future=values[start : start + horizon],
                                    decimals=decimals, season=known.season,
                                    problem=array_problem(window, options.max_length)))
    return records
