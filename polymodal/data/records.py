"""Reading data files: a JSON document, JSONL lines, and the image paths a record names.

Every problem is a `DataError` naming the file and, where there is one, the line (JSONL) or
the record (a JSON array). A byte-order mark (Windows editors write one) is not data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polymodal.config import DatasetConfig
from polymodal.data.errors import DataError
from polymodal.errors import ConfigError


@dataclass
class FileOptions(DatasetConfig):
    """Options of a format read from the user's file (`path`, required) whose records name
    media relative to `image_folder` (default: the file's folder)."""

    image_folder: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.path:
            raise ConfigError(f"path: required for format {self.format}")


def read_text(path: Path, what: str = "data file") -> str:
    """The file's text; a missing file or one that is not UTF-8 is a DataError."""
    if not path.is_file():
        raise DataError("not a file" if path.exists() else f"{what} not found", path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text (byte {error.start})", path) from None


def read_json(path: str | Path):
    """The parsed JSON document; invalid JSON is a DataError naming its line."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg})", path, line=error.lineno) from None


def jsonl_lines(path: str | Path, what: str = "data file") -> list[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line."""
    path = Path(path)
    lines = read_text(path, what).splitlines()
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), what: str = "task file") -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a line that is not a JSON object with
    the `required` keys is a DataError naming the file and line, and so is a file with none."""
    path = Path(path)
    records = []
    for number, line in jsonl_lines(path, what):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"not valid JSON ({error.msg})", path, line=number) from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise DataError(f"missing field {missing[0]!r}", path, line=number)
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path, line=number)
        records.append((number, record))
    if not records:
        raise DataError("no records", path)
    return records


def image_paths(record: dict) -> list[str]:
    """The record's image paths: `image` or `images`, a string or a list of strings.
    Raises ValueError saying what is wrong (the caller knows where the record is)."""
    keys = [key for key in ("image", "images") if record.get(key) not in (None, "", [])]
    if len(keys) > 1:
        raise ValueError("both 'image' and 'images' given; use one")
    if not keys:
        return []
    value = record[keys[0]]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        odd = next((p for p in paths if not (isinstance(p, str) and p)), None) \
            if isinstance(paths, list) else value
        got = f"a list holding {odd!r}" if isinstance(paths, list) else type(value).__name__
        raise ValueError(f"'{keys[0]}' must be a path or a list of paths, got {got}")
    return paths


def record_images(path: Path, number: int, record: dict) -> list[str]:
    """The image paths of a JSONL record (`image` or `images`), relative to the file's folder;
    a missing image, or one that is a folder, is a DataError naming the file and line."""
    try:
        names = image_paths(record)
    except ValueError as error:
        raise DataError(str(error), path, line=number) from None
    resolved = [str(path.parent / image) for image in names]
    for image in resolved:
        if not Path(image).exists():
            raise DataError(f"image not found: {image}", path, line=number)
        if not Path(image).is_file():  # a folder, FIFO or device
            raise DataError(f"not a file: {image}", path, line=number)
    return resolved
