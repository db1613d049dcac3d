"""What the series formats (`series`, `aeon`) read into before samples and items: one record
per series file, with its label (classification) or its future values (forecasting).

A series in a sample or an item is always a FILE path (`.npy` time first, or `.csv`), so
feature caches, bad-sample listing and `chat --series FILE` stay path-based: series read
from a dataset file (a `.ts` file, an aeon set, a forecasting series cut into windows) are
written once as `.npy` files under the cache (`series_cache`), each atomically.

A forecasting answer is the future written as text by `format_values` ("112 118 132"),
with a number of decimals fixed per set (`choose_decimals`); `parse_values` reads numbers
back from a model's answer (the forecast eval task, a regression objective's targets).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polymodal.data.sample import Item, Sample
from polymodal.errors import UserError
from polymodal.gguf_cache import cache_root
from polymodal.processing.series import read_series
from polymodal.safe_files import atomic_write

PLACEHOLDER = "<series>"  # LLMConfig.placeholder("series")
DEFAULT_MAX_LENGTH = 4096  # longer series are bad samples (a format's `max_length`)
CLASS_QUESTION = "Which class is this series?"
FORECAST_QUESTION = "What are the next {horizon} values?"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class SeriesRecord:
    """One series and what is asked about it.

    `path`: the series file; `label`: its class (classification) or None; `future`: the
    values that follow it, [H] or [H, C] (forecasting) or None; `decimals`: how many the
    answer writes; `season`: the set's seasonal period (steps), for a forecast's MASE;
    `problem`: why the series cannot be used (a bad sample), `where`: its place in its file.
    """

    id: str
    path: str
    question: str
    label: str | None = None
    future: np.ndarray | None = field(default=None, compare=False)
    decimals: int = 0
    season: int | None = None
    problem: str | None = None
    where: str | None = None

    @property
    def answer(self) -> str:
        return self.label if self.future is None else format_values(self.future, self.decimals)

    def sample(self) -> Sample:
        """The training conversation: user "<series>\\n{question}", assistant the answer."""
        messages = [{"role": "user", "content": f"{PLACEHOLDER}\n{self.question}"},
                    {"role": "assistant", "content": self.answer}]
        media = {"series": [self.path]} if self.path else {}  # a malformed record names no file
        return Sample(self.id, messages, [], problem=self.problem, where=self.where, media=media)

    def item(self) -> Item:
        """The evaluation question. `info`: {"type": "class", "label"} or {"type": "forecast",
        "future": [H] or [H][C] floats, "horizon", "decimals", "season" (None: unknown)}."""
        if self.future is None:
            info = {"type": "class", "label": self.label}
        else:
            info = {"type": "forecast", "future": self.future.tolist(), "horizon": len(self.future),
                    "decimals": self.decimals, "season": self.season}
        return Item(self.id, self.question, [], [self.answer], info, media={"series": [self.path]})


def format_values(values, decimals: int) -> str:
    """Future values as an answer: steps separated by spaces, a step's channels by commas,
    each with `decimals` decimals ("112 118 132"; [H, C] -> "1.5,3.0 1.7,2.9").

    Example:
        format_values([112.0, 118.4], 0) == "112 118"
    """
    array = np.asarray(values, dtype=np.float64)
    rows = array.reshape(len(array), -1)
    return " ".join(",".join(_number(value, decimals) for value in row) for row in rows)


def _number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text  # -0.2 is "0", not "-0"


def parse_values(text: str) -> list[float]:
    """The numbers written in `text`, in order (a step's channels follow one another, as
    `format_values` writes them); anything else in the text is skipped.

    Example:
        parse_values("112 118, then 132.5") == [112.0, 118.0, 132.5]
    """
    return [float(match) for match in NUMBER.findall(text)]


def choose_decimals(values) -> int:
    """Decimals that keep three significant digits of a set's typical value (its median
    magnitude): 0 for airline passengers (~300), 1 for ~45, 3 for ~0.5; at most 6."""
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))
    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes > 0)]
    if not len(magnitudes):
        return 0
    return int(min(6, max(0, 2 - math.floor(math.log10(float(np.median(magnitudes)))))))


def series_cache() -> Path:
    """Where series read from dataset files are written (`POLYMODAL_CACHE`/series, default
    ~/.cache/polymodal/series; the temp folder when the cache is off)."""
    root = cache_root() or Path(tempfile.gettempdir()) / "polymodal"
    return root / "series"


def file_key(path: Path) -> str:
    """A folder name for a dataset file's series: its stem and a hash of where it is, its
    size and modification time (a changed file gets new series files)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:16]}"


def write_series(series: np.ndarray, path: Path) -> str:
    """A series [C, T] written once as `path` (.npy, time first [T, C]), atomically."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        time_first = np.ascontiguousarray(np.asarray(series, dtype=np.float32).T)

        def save(temp: Path) -> None:
            with open(temp, "wb") as handle:  # a handle: np.save would add .npy to the temp name
                np.save(handle, time_first)

        atomic_write(path, save)
    return str(path)


def array_problem(series: np.ndarray, max_length: int) -> str | None:
    """Why a series [C, T] cannot be used, or None: too long, or NaN/inf values."""
    steps = series.shape[-1]
    if steps > max_length:
        return f"series of {steps} steps is longer than max_length {max_length}"
    bad = ~np.isfinite(series)
    if bad.any():
        channel, step = (int(i) for i in np.argwhere(bad)[0])
        what = "NaN" if np.isnan(series[channel, step]) else "inf"
        return f"has {what} at step {step} of channel {channel}"
    return None


# (path, size, modification time, max_length) -> the verdict: a run reads its datasets
# several times (epochs, encoder sizes, each stage); each file is read once per version.
_FILE_PROBLEMS: dict[tuple[str, int, int, int], str | None] = {}


def file_problem(path: str, max_length: int) -> str | None:
    """Why the series file at `path` cannot be used (read_series' message, or too long), or None."""
    try:
        status = os.stat(path)
        key = (path, status.st_size, status.st_mtime_ns, max_length)
    except OSError:
        key = None  # read_series names the problem
    if key in _FILE_PROBLEMS:
        return _FILE_PROBLEMS[key]
    try:
        verdict = array_problem(read_series(path).numpy(), max_length)
    except UserError as error:
        verdict = str(error)
    if key is not None:
        _FILE_PROBLEMS[key] = verdict
    return verdict
