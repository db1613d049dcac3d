"""Time series files -> float32 tensors [C, T] (channels, time steps), and the NaN padding
that makes a batch of ragged series one tensor.

One series is a `.npy` file (an array [T], or [T, C] time first as in a CSV), a `.csv` file
(rows are time steps, columns channels, an optional header row of names), or an array
already in memory (a request's JSON array, a row of a dataset file), read the same way.
Padding uses NaN because NaN in an encoder's input means "no value here", never data:
encoders mask it (their statistics over observed values only) and replace it before any
parameter sees it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from polymodal.errors import ConfigError, UserError

SERIES_SUFFIXES = {".npy", ".csv"}
# Limits on what one read takes in (a file or a request): far above any encoder's length,
# low enough that a wrong file (an image's pixels saved as .npy, a log of a year at 1 kHz)
# is refused before it fills memory. A data format's own `max_length` is lower.
MAX_SERIES_STEPS = 100_000
MAX_SERIES_CHANNELS = 1_000


def read_series(source: str | Path | np.ndarray | list) -> torch.Tensor:
    """One series as a float32 tensor [C, T].

    Args:
        source: a `.npy` or `.csv` file, or an array (numpy or nested lists) laid out as a
            file is: [T] for one channel, [T, C] time first. A leading axis of size 1
            ([1, T, C]) is dropped.

    Raises:
        UserError naming the file (or "the series sent" for an array) when it is missing or
        unreadable, of another suffix, empty, not numeric, holds NaN or inf ("has NaN at
        step 12 of channel 3": steps and channels counted from 0), has more than 3 axes or
        several series, or exceeds MAX_SERIES_STEPS / MAX_SERIES_CHANNELS.
    """
    if isinstance(source, (str, Path)):
        name = str(source)
        array = _read_file(Path(source))
    else:
        name = "the series sent"
        try:
            array = np.asarray(source)
        except ValueError:  # ragged nested lists
            raise UserError(f"{name}: rows of different lengths; give [T] or [T, C] values") from None
    return torch.from_numpy(_checked(array, name))


def _read_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"series file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SERIES_SUFFIXES:
        raise UserError(f"{path}: not a series file (give .npy or .csv; a .ts file holds a "
                        f"dataset: use the `series` data format)")
    try:
        return _read_npy(path) if suffix == ".npy" else _read_csv(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def _read_npy(path: Path) -> np.ndarray:
    # Memory-mapped first, so a huge array is refused by its shape before it is read.
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError):  # a pickle, a damaged header, a truncated file
        raise UserError(f"{path}: not a numpy .npy file of numbers") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path}: not a numpy .npy file of one array")
    _check_shape(array.shape, str(path))
    return np.array(array)


def _read_csv(path: Path) -> np.ndarray:
    """Rows of numbers; a first row that is not all numbers is the header of channel names."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if rows and not all(_is_number(cell) for cell in rows[0]):
        rows = rows[1:]
    if not rows:
        raise UserError(f"{path}: empty (no rows of values)")
    width = len(rows[0])
    values = np.empty((len(rows), width), dtype=np.float64)
    for step, row in enumerate(rows):
        if len(row) != width:
            raise UserError(f"{path}: step {step} has {len(row)} values, the first has {width}")
        for channel, cell in enumerate(row):
            if not _is_number(cell):
                raise UserError(f"{path}: {cell.strip()!r} at step {step} of channel {channel} "
                                f"is not a number")
            values[step, channel] = float(cell)
    return values


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _check_shape(shape: tuple[int, ...], name: str) -> None:
    if len(shape) > 3:
        raise UserError(f"{name}: has {len(shape)} axes; a series is [T] or [T, C]")
    if len(shape) == 3 and shape[0] != 1:
        raise UserError(f"{name}: holds {shape[0]} series; give one per file (a dataset of many "
                        f"is read by the `series` data format)")
    if 0 in shape or not shape:
        raise UserError(f"{name}: empty (shape {list(shape)})")
    steps, channels = (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[0], 1)
    if steps > MAX_SERIES_STEPS:
        raise UserError(f"{name}: {steps} steps, more than the {MAX_SERIES_STEPS} a series may have")
    if channels > MAX_SERIES_CHANNELS:
        raise UserError(f"{name}: {channels} channels, more than the {MAX_SERIES_CHANNELS} a "
                        f"series may have (is it [C, T]? a series is read time first, [T, C])")


def _checked(array: np.ndarray, name: str) -> np.ndarray:
    """[T], [T, C] or [1, T, C] numbers -> finite float32 [C, T]."""
    _check_shape(array.shape, name)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise UserError(f"{name}: not numeric (values of type {array.dtype})")
    array = array.reshape(array.shape[-2:] if array.ndim >= 2 else (-1, 1))  # [T, C]
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: named below
        values = np.ascontiguousarray(array.T, dtype=np.float32)  # [C, T]
    bad = ~np.isfinite(values)
    if bad.any():
        channel, step = (int(i) for i in np.argwhere(bad)[0])
        original = float(array[step, channel])
        what = "NaN" if np.isnan(original) else "inf" if np.isinf(original) \
            else f"{original:g}, beyond float32's range,"
        raise UserError(f"{name}: has {what} at step {step} of channel {channel}")
    return values


def crop_series(series: torch.Tensor, length: int) -> torch.Tensor:
    """A series [C, T] cut to its last `length` steps, [C, min(T, length)].

    A fixed lookback, as PatchTST (Nie et al., ICLR 2023) and Time-LLM (Jin et al., ICLR
    2024) take one: a longer input keeps its most recent steps, the ones a forecast
    continues from and a classifier of "what is happening now" reads. The one place a
    series is cut: eval, chat and serve all load through `pad_series`."""
    return series[:, -length:] if series.shape[1] > length else series


def pad_series(series: torch.Tensor, channels: int, length: int, source: str | None = None) -> torch.Tensor:
    """A series [C, T] as an encoder's input [channels, length], padded with NaN.

    Time is padded on the LEFT, so the latest step stays last (forecasting continues from
    it); missing channels are added after the series' own. NaN marks padding, never data.
    A series longer than `length` keeps its last `length` steps (`crop_series`); absolute
    limits on a series' size are the reader's (MAX_SERIES_STEPS) and the server's.

    Args:
        series: float32 [C, T], finite (as `read_series` gives it).
        channels, length: the encoder's sizes (both at least 1).
        source: the file's name, put before a message.

    Raises:
        UserError when C > channels ("series of 8 channels has more than the encoder's 6");
        ConfigError when a size is still 0 ("from the training data").
    """
    prefix = f"{source}: " if source else ""
    if channels < 1 or length < 1:
        raise ConfigError("the series encoder's channels and length are 0 (taken from the training "
                          "data): train the model first, or set model.encoders.series.channels "
                          "and .length")
    count = series.shape[0]
    if count > channels:
        raise UserError(f"{prefix}series of {count} channels has more than the encoder's {channels}")
    series = crop_series(series, length)
    steps = series.shape[1]
    padded = torch.full((channels, length), float("nan"), dtype=torch.float32)
    padded[:count, length - steps :] = series
    return padded
