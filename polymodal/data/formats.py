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
    problem: str | None = None  # why the record cannot be used, found while reading it


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the JSON.
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """LLaVA's conversation format; a malformed record is a sample whose `problem` names it.

    `image` or `images` holds one path or a list of paths (either key, either form). Turns
    before the first user turn that are the assistant's are dropped, as LLaVA and xtuner do:
    there is nothing they answer (a chat template would refuse them).
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    records = _read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records")
    samples = []
    for index, record in enumerate(records):
        identifier = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        try:
            images, messages = _llava_record(record, f"record {index}")
        except UserError as error:  # one odd record is a bad sample, listed; the rest train
            samples.append(Sample(identifier, [], [], problem=str(error)))
            continue
        samples.append(Sample(identifier, messages, [str(folder / i) for i in images]))
    return samples


def _llava_record(record, where: str) -> tuple[list[str], list[dict]]:
    """(image paths, messages) of one LLaVA record; a UserError says what is wrong with it."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    images = image_paths(record, where)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise UserError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} objects")
    unknown = [turn.get("from") for turn in turns
               if not (isinstance(turn.get("from"), str) and turn["from"] in ROLES)]
    if unknown:
        raise UserError(f"{where}: unknown role {unknown[0]!r} in 'from' (known: {', '.join(ROLES)})")
    messages = [{"role": ROLES[turn["from"]], "content": turn.get("value")} for turn in turns]
    if not all(isinstance(m["content"], str) for m in messages):
        raise UserError(f"{where}: conversations[].value must be text")
    return images, without_leading_answers(messages)


def image_paths(record: dict, where: str) -> list[str]:
    """The record's image paths: `image` or `images`, a string or a list of strings."""
    keys = [key for key in ("image", "images") if record.get(key) not in (None, "", [])]
    if len(keys) > 1:
        raise UserError(f"{where}: both 'image' and 'images' given; use one")
    if not keys:
        return []
    value = record[keys[0]]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        odd = next((p for p in paths if not (isinstance(p, str) and p)), None) \
            if isinstance(paths, list) else value
        got = f"a list holding {odd!r}" if isinstance(paths, list) else type(value).__name__
        raise UserError(f"{where}: '{keys[0]}' must be a path or a list of paths, got {got}")
    return paths


def without_leading_answers(messages: list[dict]) -> list[dict]:
    """The conversation without assistant turns that come before its first user turn."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]


def read_captions(path: str | Path, image_folder: str | Path | None = None,
                  prompt: str = CAPTION_PROMPT) -> list[Sample]:
    """Caption pairs, one JSON object per line; a malformed line is a sample whose `problem`
    names the file and line (listed as bad, as LLaVA records are)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    samples = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not data
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        identifier = f"{path.stem}:{number}"
        try:
            record = json.loads(line)
            image, text = record["image"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            record = image = text = None
        if not (isinstance(image, str) and image and isinstance(text, str)):
            problem = f'{path}:{number}: expected {{"image": PATH, "text": CAPTION}} (two strings)'
            samples.append(Sample(identifier, [], [], problem=problem))
            continue
        messages = [{"role": "user", "content": f"<image>\n{prompt}"},
                    {"role": "assistant", "content": text}]
        samples.append(Sample(identifier, messages, [str(folder / image)]))
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
    images = str(folder / "images")  # joined as strings: 38,575 Path joins take 0.2 s
    try:
        found = [(question, answer, f"{images}/{image_id}.png") for question, answer, image_id in triples]
    except (TypeError, ValueError):
        found = None
    if found is None or not all(isinstance(q, str) and isinstance(a, str) for q, a, _ in found):
        raise UserError(f"{folder / 'questions.json'}: expected [question, answer, image_id] "
                        f"triples (question and answer as text)")
    return found


def easy_vqa_by_image(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Image path -> its (question, answer) pairs, in file order."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image in read_easy_vqa_questions(folder):
        by_image[image].append((question, answer))
    return by_image


def easy_vqa_question_type(answer: str) -> str:
    """shape, colour or yes/no: the question types easy-VQA's accuracy is reported by."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if attribute_kind(answer) == "shape" else "colour"


EASY_VQA_QUESTION_TYPES = ("shape", "colour", "yes/no")


def read_easy_vqa(split: str | None = "train", folder: str | Path | None = None,
                  flip_yes_no: bool = False, question_types: list[str] | None = None) -> list[Sample]:
    """One conversation per image: its questions in file order, the image in the first turn.

    `flip_yes_no`: instead, for each yes/no question about a shape or colour the image does
    not have, the same question about the one it has, answer flipped ("is there a red
    shape?" no -> "is there a blue shape?" yes). easy-VQA asks mostly about absent colours,
    so "no" dominates its yes/no answers; mixed in, these balance them, as POPE balances probes.
    `question_types`: keep only questions of these types (`easy_vqa_question_type`).
    """
    by_image = easy_vqa_by_image(easy_vqa_folder(split, folder))
    if flip_yes_no:
        by_image = {image: flipped_yes_no(pairs) for image, pairs in by_image.items()}
    if question_types is not None:
        by_image = {image: [(q, a) for q, a in pairs if easy_vqa_question_type(a) in question_types]
                    for image, pairs in by_image.items()}
    samples = []
    for image, pairs in by_image.items():
        if not pairs:
            continue
        messages = []
        for turn, (question, answer) in enumerate(pairs):
            messages.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question})
            messages.append({"role": "assistant", "content": answer})
        samples.append(Sample(Path(image).stem, messages, [image]))
    return samples


# ---------------------------------------------------------------- easy-VQA captions

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")


def attribute_kind(word: str) -> str | None:
    """"shape", "color", or None for a word that names neither."""
    return "shape" if word in EASY_VQA_SHAPES else "color" if word in EASY_VQA_COLORS else None


def easy_vqa_attributes(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The shape and colour of one image ({"shape", "color"}, either may be missing), read
    from its questions and answers: "what color is the circle?" -> red names both, and
    "is there not a red shape?" -> no says the shape is red."""
    found: dict[str, str] = {}

    def note(word: str) -> None:
        found[attribute_kind(word)] = word

    for question, answer in pairs:
        words = question.lower().rstrip("?").split()
        named = [w for w in words if attribute_kind(w)]
        if answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            if (answer == "yes") != negated:  # the named attribute is present
                for word in named:
                    note(word)
        else:
            for word in (*named, answer):
                note(word)
    return found


def flipped_yes_no(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The yes/no questions naming an absent attribute, asked about the present one instead."""
    attributes = easy_vqa_attributes(pairs)
    flipped = []
    for question, answer in pairs:
        words = question.rstrip("?").split()
        negated = "not" in words or "no" in words
        if answer not in ("yes", "no") or (answer == "yes") != negated:
            continue  # not yes/no, or its attribute is present already
        for index, word in enumerate(words):
            kind = attribute_kind(word)
            if kind and attributes.get(kind) and attributes[kind] != word:
                words[index] = attributes[kind]
                flipped.append((" ".join(words) + "?", "no" if answer == "yes" else "yes"))
                break
    return flipped


def easy_vqa_caption(attributes: dict[str, str]) -> str | None:
    shape, color = attributes.get("shape"), attributes.get("color")
    if shape and color:
        return f"a {color} {shape}"
    if shape:
        return f"a {shape}"
    return f"a {color} shape" if color else None


def easy_vqa_image_attributes(split: str | None = "train", folder: str | Path | None = None
                              ) -> list[tuple[str, dict[str, str]]]:
    """(image path, its {"shape", "color"} as far as its questions tell) for every image."""
    return [(image, easy_vqa_attributes(pairs))
            for image, pairs in easy_vqa_by_image(easy_vqa_folder(split, folder)).items()]


def read_easy_vqa_captions(split: str | None = "train", folder: str | Path | None = None) -> list[Sample]:
    """Caption pairs ("a red triangle") derived from each image's easy-VQA questions; images
    whose questions reveal neither shape nor colour are left out."""
    samples = []
    for image, found in easy_vqa_image_attributes(split, folder):
        caption = easy_vqa_caption(found)
        if caption is not None:
            messages = [{"role": "user", "content": f"<image>\n{CAPTION_PROMPT}"},
                        {"role": "assistant", "content": caption}]
            samples.append(Sample(Path(image).stem, messages, [image]))
    return samples


def split_turns(sample: Sample, turns: int, placeholder: str = "<image>") -> list[Sample]:
    """A one-image conversation cut into parts of at most `turns` user/assistant exchanges,
    the image placed at the start of each part; others (system turns, several images) stay whole."""
    messages = sample.messages
    roles = [m["role"] for m in messages]
    if len(sample.images) != 1 or "system" in roles or roles[::2] != ["user"] * len(roles[::2]) \
            or roles[1::2] != ["assistant"] * len(roles[1::2]) or len(messages) <= 2 * turns:
        return [sample]
    parts = []
    for start in range(0, len(messages), 2 * turns):
        chunk = [dict(m) for m in messages[start : start + 2 * turns]]
        for message in chunk:
            message["content"] = message["content"].replace(placeholder, "").lstrip("\n")
        chunk[0]["content"] = f"{placeholder}\n{chunk[0]['content']}"
        parts.append(Sample(f"{sample.id}#{start // 2}", chunk, list(sample.images)))
    return parts
