"""`format: llava`: LLaVA's conversation JSON.

`[{"id", "image" | "images", "conversations": [{"from": "human" | "gpt", "value"}]}]`, image
paths relative to `image_folder` (default: the file's folder); `<image>` marks where each
image goes. A malformed record is a sample whose `problem` says what is wrong and `where`
names the record (`data.json, record 3 (id 'a17')`): it is listed as bad; the rest train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polymodal.data.errors import DataError, location
from polymodal.data.records import FileOptions, image_paths, read_json
from polymodal.data.sample import Sample
from polymodal.registry import register_dataset_format

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class LlavaOptions(FileOptions):
    """A LLaVA JSON file (`path`) and the folder its image paths are relative to."""

    format: str = "llava"


class RecordError(ValueError):
    """What is wrong with one record (the reader adds where it is)."""


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """LLaVA's conversation format; a malformed record is a sample whose `problem` names it.

    `image` or `images` holds one path or a list of paths (either key, either form). Turns
    before the first user turn that are the assistant's are dropped, as LLaVA and xtuner do:
    there is nothing they answer (a chat template would refuse them).
    Raises DataError for a file that is missing, not JSON, or not a list of records.
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError("expected a JSON list of records", path)
    samples = []
    for index, record in enumerate(records):
        has_id = isinstance(record, dict) and "id" in record
        identifier = str(record["id"]) if has_id else str(index)
        where = location(path, record=index, record_id=identifier if has_id else None)
        try:
            images, messages = llava_record(record)
        except RecordError as error:  # one odd record is a bad sample, listed; the rest train
            samples.append(Sample(identifier, [], [], problem=str(error), where=where))
            continue
        samples.append(Sample(identifier, messages, [str(folder / i) for i in images], where=where))
    return samples


@register_dataset_format("llava", config=LlavaOptions)
def read_llava(options: LlavaOptions) -> list[Sample]:
    """LLaVA conversation JSON: records of conversations and their images."""
    return read_llava_json(options.path, options.image_folder)


def llava_record(record) -> tuple[list[str], list[dict]]:
    """(image paths, messages) of one LLaVA record; a RecordError says what is wrong with it."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    try:
        images = image_paths(record)
    except ValueError as error:
        raise RecordError(str(error)) from None
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise RecordError("'conversations' must be a list of {\"from\", \"value\"} objects")
    unknown = [turn.get("from") for turn in turns
               if not (isinstance(turn.get("from"), str) and turn["from"] in ROLES)]
    if unknown:
        raise RecordError(f"unknown role {unknown[0]!r} in 'from' (known: {', '.join(ROLES)})")
    messages = [{"role": ROLES[turn["from"]], "content": turn.get("value")} for turn in turns]
    if not all(isinstance(m["content"], str) for m in messages):
        raise RecordError("conversations[].value must be text")
    return images, without_leading_answers(messages)


def without_leading_answers(messages: list[dict]) -> list[dict]:
    """The conversation without assistant turns that come before its first user turn."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
