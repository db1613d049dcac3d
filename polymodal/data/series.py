"""`format: series`: time series with a class label or a future window, from the user's files.

`path` is one of:
- a JSONL manifest, one record a line: {"series": FILE, "label": "walking"} (classification)
  or {"series": FILE, "future": FILE or [values]} (forecasting: the values that follow the
  series, [H] or [H][C]); optional "id" and "question". FILE (`.npy` [T] or [T, C], `.csv`
  rows of steps; processing/series.py) is relative to the manifest's folder.
- a UCR/UEA `.ts` file (many series and their class labels; aeon's reader), its series
  written once as `.npy` files under the cache (data/series_records.py).
- a folder of class folders: `walking/a.npy`, `running/b.csv`, ... (the folder is the label).

Each series becomes one conversation: user "<series>\\n{question}", assistant the label, or
the future as text (`format_values`, decimals fixed per file). A series that cannot be used
(missing, NaN, longer than `max_length` steps) is a bad sample with its reason, not fatal.
The options are also an `EvaluationData`: `--data FILE` of the series eval tasks reads it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from polymodal.config import DatasetConfig
from polymodal.data.errors import DataError, location
from polymodal.data.evaluation import EvaluationData
from polymodal.data.records import jsonl_lines
from polymodal.data.sample import Item, Sample
from polymodal.data.series_records import (
    CLASS_QUESTION,
    DEFAULT_MAX_LENGTH,
    FORECAST_QUESTION,
    SeriesRecord,
    array_problem,
    choose_decimals,
    file_key,
    file_problem,
    series_cache,
    write_series,
)
from polymodal.errors import ConfigError, UserError
from polymodal.processing.series import SERIES_SUFFIXES, read_series
from polymodal.registry import register_dataset_format


@dataclass
class SeriesOptions(DatasetConfig, EvaluationData):
    """A series dataset file or folder (`path`); see the module's docstring for the layouts."""

    format: str = "series"
    question: str | None = None  # None: each record's own, else "Which class is this series?"
    max_length: int = DEFAULT_MAX_LENGTH  # longer series are bad samples
    decimals: int | None = None  # forecasting answers; None: chosen from the file's values

    def __post_init__(self):
        super().__post_init__()
        if not self.path:
            raise ConfigError(f"path: required for format {self.format} (a JSONL manifest, a .ts file "
                              f"or a folder of class folders)")
        check_series_options(self)

    @classmethod
    def for_evaluation(cls, split: str, folder: str | None) -> SeriesOptions:
        if not folder:
            raise UserError("the series format needs --data: a JSONL manifest, a .ts file or a folder "
                            "of class folders")
        return cls(format="series", path=folder)

    def records(self) -> list[SeriesRecord]:
        return read_series_records(Path(self.path), self.question, self.max_length, self.decimals)

    def question_items(self) -> list[Item]:
        return usable_items(self.records(), self.name)


def check_series_options(options) -> None:
    """The checks `series` and `aeon` share: max_length and decimals in range."""
    if options.max_length < 1:
        raise ConfigError(f"max_length: must be at least 1, got {options.max_length}")
    if options.decimals is not None and not 0 <= options.decimals <= 10:
        raise ConfigError(f"decimals: must be 0 to 10, got {options.decimals}")


@register_dataset_format("series", config=SeriesOptions)
def read_series_format(options: SeriesOptions) -> list[Sample]:
    """Series with a label or a future window: a JSONL manifest, a .ts file or class folders."""
    return [record.sample() for record in options.records()]


def usable_items(records: list[SeriesRecord], name: str) -> list[Item]:
    """The records' eval questions; those that cannot be used are left out and counted on
    stderr with the first one's reason (an eval is not stopped by one bad series)."""
    bad = [record for record in records if record.problem]
    if bad:
        first = bad[0]
        print(f"{name}: {len(bad)} of {len(records)} series left out; first: "
              f"{first.where or first.id}: {first.problem}", file=sys.stderr)
    return [record.item() for record in records if not record.problem]


def read_series_records(path: Path, question: str | None, max_length: int,
                        decimals: int | None = None) -> list[SeriesRecord]:
    """The records of a manifest, a .ts file or a folder of class folders.
    Raises DataError naming `path` when it is missing, of another kind, or holds none."""
    if not path.exists():
        raise DataError("series dataset not found", path)
    if path.is_dir():
        records = folder_records(path, question, max_length)
    elif path.suffix.lower() == ".ts":
        records = ts_records(path, question or CLASS_QUESTION, max_length)
    elif path.suffix.lower() == ".jsonl":
        records = manifest_records(path, question, max_length, decimals)
    else:
        raise DataError("not a series dataset (give a JSONL manifest, a .ts file or a folder of "
                        "class folders)", path)
    if not records:
        raise DataError("holds no series", path)
    return records


# ---------------------------------------------------------------- .ts files


@lru_cache(maxsize=16)
def _parsed_ts(path: str, size: int, modified: int) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """aeon's parse of a .ts file, once per process and file version (a recipe reads it per stage)."""
    try:
        from aeon.datasets import load_from_ts_file
    except ImportError:
        raise UserError("reading .ts files needs aeon (pip install aeon)") from None
    try:
        series, labels, meta = load_from_ts_file(path, return_meta_data=True)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as error:
        raise DataError(f"not a readable .ts file ({type(error).__name__}: {error})", path) from None
    if meta.get("targetlabel"):
        raise DataError("holds regression targets (@targetLabel true); the series format reads "
                        "class labels", path)
    if labels is None or not meta.get("classlabel") or len(labels) != len(series):
        raise DataError("holds no class labels (@classLabel true and a label ending each series)", path)
    arrays = tuple(np.asarray(one, dtype=np.float64) for one in series)  # each [C, T]
    return arrays, tuple(str(label) for label in labels)


def read_ts(path: Path) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """(series [C, T] each, their labels) of a UCR/UEA .ts file. Raises DataError naming it."""
    stat = path.stat()
    return _parsed_ts(str(path), stat.st_size, stat.st_mtime_ns)


def ts_records(path: Path, question: str, max_length: int) -> list[SeriesRecord]:
    """One record per series of a .ts file; each written to the cache as `.npy`."""
    folder = series_cache() / "ts" / file_key(path)
    series, labels = read_ts(path)
    return [SeriesRecord(f"{path.stem}:{index}", write_series(one, folder / f"{index:05d}.npy"), question,
                         label=label, problem=array_problem(one, max_length),
                         where=location(path, record=index))
            for index, (one, label) in enumerate(zip(series, labels))]


# ---------------------------------------------------------------- folders and manifests


def folder_records(folder: Path, question: str | None, max_length: int) -> list[SeriesRecord]:
    """`folder/<label>/<file>.npy|.csv`: one record per file, its folder the label."""
    records = []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(p for p in class_folder.iterdir() if p.suffix.lower() in SERIES_SUFFIXES):
            records.append(SeriesRecord(f"{class_folder.name}/{file.stem}", str(file), question or CLASS_QUESTION,
                                        label=class_folder.name, problem=file_problem(str(file), max_length),
                                        where=str(file)))
    return records


def manifest_records(path: Path, question: str | None, max_length: int,
                     decimals: int | None) -> list[SeriesRecord]:
    """One record per JSONL line; a malformed record is a record with a `problem`. Invalid
    JSON is a DataError naming the line. Forecasting answers share one number of decimals
    (`decimals`, else chosen from all the file's future values)."""
    records = []
    for number, line in jsonl_lines(path):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"not valid JSON ({error.msg})", path, line=number) from None
        records.append(manifest_record(path, number, entry, question, max_length))
    futures = [r.future for r in records if r.future is not None]
    if decimals is None:
        decimals = choose_decimals(np.concatenate([f.ravel() for f in futures])) if futures else 0
    return [dataclasses.replace(r, decimals=decimals) for r in records]


def manifest_record(path: Path, number: int, entry, question: str | None, max_length: int) -> SeriesRecord:
    """One manifest line as a record; what is wrong with it becomes its `problem`."""
    where = location(path, line=number)
    identifier = str(entry["id"]) if isinstance(entry, dict) and "id" in entry else f"{path.stem}:{number}"
    asked = entry.get("question") if isinstance(entry, dict) else None
    asked = asked if isinstance(asked, str) and asked else question
    bad = manifest_problem(entry)
    if bad:
        return SeriesRecord(identifier, "", asked or CLASS_QUESTION, label="", problem=bad, where=where)
    series = str(path.parent / entry["series"])
    problem = file_problem(series, max_length)
    if "label" in entry:
        return SeriesRecord(identifier, series, asked or CLASS_QUESTION, label=str(entry["label"]),
                            problem=problem, where=where)
    future, future_problem = read_future(entry["future"], path.parent)
    if future is None:
        return SeriesRecord(identifier, series, asked or CLASS_QUESTION, label="",
                            problem=future_problem, where=where)
    return SeriesRecord(identifier, series, asked or FORECAST_QUESTION.format(horizon=len(future)),
                        future=future, problem=problem, where=where)


def manifest_problem(entry) -> str | None:
    """What is wrong with a manifest record's shape, or None."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    if not isinstance(entry.get("series"), str) or not entry["series"]:
        return "'series' must be the path of a series file (.npy or .csv)"
    if ("label" in entry) == ("future" in entry):
        return "give either 'label' (classification) or 'future' (forecasting)"
    if "label" in entry and not isinstance(entry["label"], (str, int, float)):
        return f"'label' must be text or a number, got {type(entry['label']).__name__}"
    return None


def read_future(value, folder: Path) -> tuple[np.ndarray | None, str | None]:
    """(the future values [H] or [H, C], None) or (None, why they cannot be used): a series
    file relative to `folder`, or a list of values laid out as a file is (time first)."""
    try:
        future = read_series(str(folder / value) if isinstance(value, str) else value).numpy()
    except UserError as error:
        return None, f"future: {error}"
    return (future[0] if len(future) == 1 else future.T).astype(np.float64), None
