"""`format: captions`: (image, caption) pairs, one JSON object per line, asked as
"Describe the image." A malformed line is a sample whose `problem` says so and whose `where`
is the file and line (listed as bad, as LLaVA records are)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.errors import location
from polymodal.data.records import FileOptions, jsonl_lines
from polymodal.data.sample import Sample
from polymodal.registry import register_dataset_format

CAPTION_PROMPT = "Describe the image."


@dataclass
class CaptionsOptions(FileOptions):
    """A caption JSONL file (`path`) and the folder its image paths are relative to."""

    format: str = "captions"


def caption_sample(identifier: str, image: str, caption: str, prompt: str = CAPTION_PROMPT,
                   where: str | None = None) -> Sample:
    """The one-turn conversation that teaches `caption` for `image`."""
    messages = [{"role": "user", "content": f"<image>\n{prompt}"}, {"role": "assistant", "content": caption}]
    return Sample(identifier, messages, [image], where=where)


def read_captions(path: str | Path, image_folder: str | Path | None = None,
                  prompt: str = CAPTION_PROMPT) -> list[Sample]:
    """`{"image": PATH, "text": CAPTION}` per line. Raises DataError for a file that is
    missing or not UTF-8; a bad line is a bad sample."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    samples = []
    for number, line in jsonl_lines(path):
        identifier, where = f"{path.stem}:{number}", location(path, line=number)
        try:
            record = json.loads(line)
            image, text = record["image"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            image = text = None
        if not (isinstance(image, str) and image and isinstance(text, str)):
            problem = 'expected {"image": PATH, "text": CAPTION} (two strings)'
            samples.append(Sample(identifier, [], [], problem=problem, where=where))
            continue
        samples.append(caption_sample(identifier, str(folder / image), text, prompt, where))
    return samples


@register_dataset_format("captions", config=CaptionsOptions)
def read_caption_pairs(options: CaptionsOptions) -> list[Sample]:
    """Caption pairs: JSONL lines of {"image", "text"}."""
    return read_captions(options.path, options.image_folder)
