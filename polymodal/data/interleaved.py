"""`format: interleaved`: documents of text and images in any order (OBELICS, MMC4).

One JSON object per line:
`{"id": ..., "content": [{"type": "text", "text": "..."}, {"type": "image", "image": "a.png"}, ...]}`,
image paths relative to `image_folder` (default: the file's folder). A document may hold any
number of images, anywhere.

Training on a document is next-token loss on its text, the images being context (Flamingo,
Alayrac et al. 2022; OBELICS, Laurençon et al. 2023). Here labels fall on assistant turns and
images stand in user turns (data/validate.py), so a document becomes a conversation in its own
reading order: each run of adjacent images is a user turn of their placeholders, each run of text
the assistant turn after it; a document that opens with text gets an empty user turn first, and
images after the last text are dropped (nothing follows them to predict). Adjacent text parts are
one text, joined as written.

A record that cannot be used (not an object, no content, a part of an unknown type, an image
that is not a file, no text) is a sample whose `problem` says what is wrong and whose `where`
is the file and line: it is listed as bad; the rest train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.errors import location
from polymodal.data.records import FileOptions, jsonl_lines
from polymodal.data.sample import Sample
from polymodal.registry import register_dataset_format

PLACEHOLDER = "<image>"
PART_TYPES = ("text", "image")


@dataclass
class InterleavedOptions(FileOptions):
    """An interleaved-document JSONL file (`path`) and the folder its image paths are relative to."""

    format: str = "interleaved"


class RecordError(ValueError):
    """What is wrong with one document (the reader adds where it is)."""


def read_interleaved(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """One sample per JSONL line (its `id`, else `FILE_STEM:LINE`); a bad line is a sample
    whose `problem` names it. Raises DataError for a file that is missing or not UTF-8.

    Example:
        {"id": "d1", "content": [{"type": "image", "image": "cat.png"},
                                 {"type": "text", "text": "A cat. Next, a dog:"},
                                 {"type": "image", "image": "dog.png"}, {"type": "text", "text": "It barks."}]}
        -> user "<image>", assistant "A cat. Next, a dog:", user "<image>", assistant "It barks."
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    samples = []
    for number, line in jsonl_lines(path):
        identifier, where = f"{path.stem}:{number}", location(path, line=number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            samples.append(Sample(identifier, [], [], problem=f"not valid JSON ({error.msg})", where=where))
            continue
        if isinstance(record, dict) and record.get("id") is not None:
            identifier = str(record["id"])
        try:
            images, messages = document_conversation(document_parts(record, folder))
        except RecordError as error:  # one odd document is a bad sample, listed; the rest train
            samples.append(Sample(identifier, [], [], problem=str(error), where=where))
            continue
        samples.append(Sample(identifier, messages, images, where=where))
    return samples


@register_dataset_format("interleaved", config=InterleavedOptions)
def read_interleaved_format(options: InterleavedOptions) -> list[Sample]:
    """Interleaved documents: JSONL lines of {"id", "content": [text and image parts]}."""
    return read_interleaved(options.path, options.image_folder)


def document_parts(record, folder: Path) -> list[tuple[str, str]]:
    """The document's ("text", text) and ("image", resolved path) parts in reading order,
    whitespace-only texts left out. Raises RecordError saying which part is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    content = record.get("content")
    if not isinstance(content, list) or not content:
        raise RecordError("'content' must be a non-empty list of {\"type\": \"text\" | \"image\"} parts")
    parts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            got = repr(kind) if isinstance(part, dict) else f"a {type(part).__name__}"
            raise RecordError(f"content[{index}]: unknown part type {got} (known: {', '.join(PART_TYPES)})")
        value = part.get(kind)
        if kind == "text":
            if not isinstance(value, str):
                raise RecordError(f"content[{index}]: 'text' must be text")
            if value.strip():
                parts.append(("text", value))
            continue
        if not isinstance(value, str) or not value:
            raise RecordError(f"content[{index}]: 'image' must be a path")
        image = folder / value
        if not image.is_file():
            raise RecordError(f"content[{index}]: image {'is not a file' if image.exists() else 'not found'}: {image}")
        parts.append(("image", str(image)))
    return parts


def document_conversation(parts: list[tuple[str, str]]) -> tuple[list[str], list[dict]]:
    """(image paths, messages): images as user turns of placeholders, text as the assistant
    turns after them (the module's docstring says why). Raises RecordError for no text."""
    while parts and parts[-1][0] == "image":
        parts = parts[:-1]  # nothing after them to predict
    if not parts:
        raise RecordError("no text to learn from")
    images, messages = [], []
    for kind, value in parts:
        role = "user" if kind == "image" else "assistant"
        if kind == "image":
            images.append(value)
        if not messages and role == "assistant":
            messages.append({"role": "user", "content": ""})  # a template's turns open with the user
        text = PLACEHOLDER if kind == "image" else value
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += text
        else:
            messages.append({"role": role, "content": text})
    return images, messages
