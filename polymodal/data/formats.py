"""Dataset formats, each read into the same `Sample`: a conversation and its image paths.

- LLaVA JSON: `[{"id", "image" | "images", "conversations": [{"from": "human"|"gpt", "value"}]}]`,
  image paths relative to an image folder; `<image>` marks where each image goes.
- Caption pairs: JSONL lines `{"image", "text"}`, asked as "Describe the image."
- easy-VQA: `questions.json` ([question, answer, image_id] triples), `images/{id}.png` and
  `answers.txt`, from the `easy_vqa` package or any folder in that layout; the questions
  about one image become one multi-turn conversation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.errors import UserError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPT = "Describe the image."


@dataclass
class Sample:
    id: str
    messages: list[dict]  # [{"role", "content"}], `<image>` where each image goes
    images: list[str] = field(default_factory=list)  # paths, in placeholder order


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno})") from None


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """LLaVA's conversation format; a malformed record is an error naming its index."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    records = _read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records")
    samples = []
    for index, record in enumerate(records):
        try:
            images = record.get("images") or ([record["image"]] if record.get("image") else [])
            messages = [{"role": ROLES[turn["from"]], "content": turn["value"]}
                        for turn in record["conversations"]]
        except (KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{path}: record {index} is malformed (missing or unknown {error})") from None
        samples.append(Sample(str(record.get("id", index)), messages, [str(folder / i) for i in images]))
    return samples


def read_captions(path: str | Path, image_folder: str | Path | None = None,
                  prompt: str = CAPTION_PROMPT) -> list[Sample]:
    """Caption pairs, one JSON object per line; a malformed line is an error naming it."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, text = record["image"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: expected {{\"image\": ..., \"text\": ...}}") from None
        messages = [{"role": "user", "content": f"<image>\n{prompt}"},
                    {"role": "assistant", "content": text}]
        samples.append(Sample(f"{path.stem}:{number}", messages, [str(folder / image)]))
    return samples


def easy_vqa_folder(split: str | None = None, folder: str | Path | None = None) -> Path:
    """The easy-VQA folder of a split from the installed package, or a folder in its layout."""
    if folder is not None:
        return Path(folder)
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise UserError("package 'easy_vqa' is not installed (pip install --no-deps easy-vqa)")
    if split not in ("train", "test"):
        raise UserError(f"easy-VQA split must be train or test, got {split!r}")
    return Path(spec.origin).parent / "data" / split


def read_easy_vqa_questions(folder: Path) -> list[tuple[str, str, str]]:
    """(question, answer, image path) triples in file order."""
    triples = _read_json(folder / "questions.json")
    try:
        return [(question, answer, str(folder / "images" / f"{image_id}.png"))
                for question, answer, image_id in triples]
    except (TypeError, ValueError):
        raise UserError(f"{folder / 'questions.json'}: expected [question, answer, image_id] triples") from None


def read_easy_vqa(split: str | None = "train", folder: str | Path | None = None) -> list[Sample]:
    """One conversation per image: its questions in file order, the image in the first turn."""
    root = easy_vqa_folder(split, folder)
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image in read_easy_vqa_questions(root):
        by_image[image].append((question, answer))
    samples = []
    for image, pairs in by_image.items():
        messages = []
        for turn, (question, answer) in enumerate(pairs):
            messages.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question})
            messages.append({"role": "assistant", "content": answer})
        samples.append(Sample(Path(image).stem, messages, [image]))
    return samples
