"""The one error type for a bad record in a data file: it names the file and where in it."""

from __future__ import annotations

from pathlib import Path

from polymodal.errors import UserError


def location(path: str | Path, line: int | None = None, record: int | None = None,
             record_id: str | None = None) -> str:
    """Where a record sits, as a person finds it: `data.jsonl:12` for a line of a JSONL file,
    `data.json, record 3 (id 'a17')` for an item of a JSON array (which has no line numbers
    once parsed), or the file alone."""
    if line is not None:
        return f"{path}:{line}"
    if record is None:
        return str(path)
    return f"{path}, record {record}" + (f" (id {record_id!r})" if record_id is not None else "")


class DataError(UserError):
    """A data file that cannot be used as it is: the message is `location: reason`.

    Attributes: path (the file), line (JSONL: 1-based line number), record (a JSON array:
    0-based index), record_id (the record's own `id`), reason (what is wrong).

    Example:
        raise DataError("missing field 'answers'", path, line=3)  # "task.jsonl:3: missing field ..."
    """

    def __init__(self, reason: str, path: str | Path, line: int | None = None, record: int | None = None,
                 record_id: str | None = None):
        self.reason, self.path, self.line, self.record, self.record_id = reason, path, line, record, record_id
        super().__init__(f"{self.where}: {reason}")

    @property
    def where(self) -> str:
        return location(self.path, self.line, self.record, self.record_id)
