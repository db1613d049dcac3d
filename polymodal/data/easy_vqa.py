"""easy-VQA's one home: its files, its training formats and the questions it lends to eval.

easy-VQA (Victor Zhou, the `easy_vqa` package) is a synthetic VQA set: 64x64 images of one
coloured shape, with questions about the shape and its colour. A split is a folder holding
`questions.json` ([question, answer, image_id] triples), `images/{id}.png` and `answers.txt`:
the package's `train` or `test` split, or any folder in that layout (`path`).

Training formats (registered):
- `easy-vqa`: one conversation per image, its questions in file order (`flip_yes_no`,
  `question_types` change which questions).
- `easy-vqa-captions`: "a red triangle" per image, derived from its questions.
- `easy-vqa-speech`: those captions spoken by espeak-ng (data/speech.py), voices of the test
  split never heard in training.
Evaluation: the options (`EasyVQASplit`, an `EvaluationData`) serve the tasks that build
their questions from a dataset: the questions (task `easy-vqa`), captions (`caption`,
`retrieval`), objects (`pope`), option questions (`multiple-choice`), shape and colour
labels (`zeroshot`), spoken captions (`audio-image`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polymodal.config import DatasetConfig
from polymodal.data.captions import caption_sample
from polymodal.data.errors import DataError
from polymodal.data.evaluation import Caption, Choice, EvaluationData, Label, Objects
from polymodal.data.records import read_json
from polymodal.data.sample import Item, Sample
from polymodal.data.speech import VOICES, speak, speech_cache
from polymodal.errors import ConfigError, UserError
from polymodal.registry import register_dataset_format

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
QUESTION_TYPES = ("shape", "colour", "yes/no")  # what accuracy is reported by
# Zero-shot templates: each label's embedding is the mean over the other attribute's words
# ("a red {}", "a blue {}", ... for shapes), as CLIP ensembles over contexts.
ZEROSHOT_TEMPLATES = {"shape": [f"a {color} {{}}" for color in COLORS] + ["a {}"],
                      "color": [f"a {{}} {shape}" for shape in SHAPES] + ["a {} shape"]}

# ---------------------------------------------------------------- options


@dataclass
class EasyVQASplit(DatasetConfig, EvaluationData):
    """easy-VQA's `split` from its package, or the folder `path` in its layout (the options
    every easy-VQA format shares); also what it lends the evaluation tasks (EvaluationData)."""

    split: Literal["train", "test"] = "train"

    @property
    def name(self) -> str:
        return self.path or f"easy-vqa/{self.split}"

    @property
    def folder(self) -> Path:
        return easy_vqa_folder(self.split, self.path)

    @classmethod
    def for_evaluation(cls, split: str, folder: str | None) -> EasyVQASplit:
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "format")
        name = default if isinstance(default, str) else "easy-vqa"  # the format this class is registered as
        return cls(format=name, path=folder, split=split)  # the split is checked when the folder is looked up

    def question_items(self) -> list[Item]:
        return [Item(f"{Path(image).stem}:{number}", question, [image], [answer], {"type": question_type(answer)})
                for number, (question, answer, image) in enumerate(read_questions(self.folder))]

    def caption_pairs(self) -> list[Caption]:
        return [(image, caption) for image, found in attributes_by_image(self.folder)
                if (caption := caption_of(found))]

    def object_annotations(self) -> list[Objects]:
        """Each image holds one shape: its objects are the shape ("circle"), the coloured
        shape ("red circle") and the colour ("red shape")."""
        annotations = []
        for image, found in attributes_by_image(self.folder):
            shape, color = found.get("shape"), found.get("color")
            objects = {name for name in (shape, color and f"{color} shape",
                                         shape and color and f"{color} {shape}") if name}
            if objects:
                annotations.append((image, objects))
        return annotations

    def choice_questions(self, seed: int) -> list[Choice]:
        """Which shape (of the three), which colour (of four: the right one and three drawn)."""
        rng = random.Random(seed)
        questions = []
        for image, found in attributes_by_image(self.folder):
            stem = Path(image).stem
            if "shape" in found:
                others = [s for s in SHAPES if s != found["shape"]]
                questions.append((f"{stem}:shape", [image], "Which shape is in the image?", [found["shape"], *others]))
            if "color" in found:
                others = rng.sample([c for c in COLORS if c != found["color"]], 3)
                questions.append((f"{stem}:color", [image], "What color is the shape?", [found["color"], *others]))
        return questions

    def attribute_labels(self) -> list[Label]:
        return [(image, attribute, found[attribute]) for image, found in attributes_by_image(self.folder)
                for attribute in ("shape", "color") if attribute in found]

    def label_templates(self, attribute: str) -> list[str] | None:
        return ZEROSHOT_TEMPLATES.get(attribute)

    def spoken_captions(self) -> tuple[list[Sample], list[Caption]]:
        clips = read_easy_vqa_speech(self.split, self.path)
        gallery = [(image, caption) for caption, images in full_captions(self.folder).items() for image in images]
        return clips, gallery


@dataclass
class EasyVQAOptions(EasyVQASplit):
    """easy-VQA questions, one conversation per image."""

    format: str = "easy-vqa"
    # The yes/no questions re-asked about the attribute the image has, answer flipped (see
    # flipped_yes_no): a dataset to mix in to balance yes and no.
    flip_yes_no: bool = False
    # Only questions of these types (shape, colour, yes/no), e.g. a second dataset of the
    # yes/no questions alone, weighted, to see more of the ones learned last.
    question_types: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.question_types is not None:
            unknown = [t for t in self.question_types if t not in QUESTION_TYPES]
            if unknown or not self.question_types:
                raise ConfigError(f"question_types: {unknown[0] if unknown else 'empty'!r}; "
                                  f"choose from {', '.join(QUESTION_TYPES)}")


@dataclass
class EasyVQACaptionsOptions(EasyVQASplit):
    """easy-VQA images with captions derived from their questions."""

    format: str = "easy-vqa-captions"


@dataclass
class EasyVQASpeechOptions(EasyVQASplit):
    """easy-VQA captions spoken in the split's voices."""

    format: str = "easy-vqa-speech"


# ---------------------------------------------------------------- files


def easy_vqa_folder(split: str | None = None, folder: str | Path | None = None) -> Path:
    """The easy-VQA folder of a split from the installed package, or a folder in its layout."""
    if folder is not None:
        return Path(folder)
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise UserError("package 'easy_vqa' is not installed (pip install --no-deps easy-vqa)")
    if split not in ("train", "test"):
        raise UserError(f"easy-VQA split must be train or test, got {split!r}")
    return Path(spec.origin).parent / "data" / split


def read_questions(folder: Path) -> list[tuple[str, str, str]]:
    """(question, answer, image path) triples in file order; DataError naming the first bad triple."""
    path = folder / "questions.json"
    triples = read_json(path)
    if not isinstance(triples, list):
        raise DataError("expected a JSON list of [question, answer, image_id] triples", path)
    images = str(folder / "images")  # joined as strings: tens of thousands of Path joins add up
    found = []
    for index, triple in enumerate(triples):
        if not (isinstance(triple, list) and len(triple) == 3 and isinstance(triple[0], str)
                and isinstance(triple[1], str)):
            raise DataError("expected [question, answer, image_id] (question and answer as text)",
                            path, record=index)
        found.append((triple[0], triple[1], f"{images}/{triple[2]}.png"))
    return found


def questions_by_image(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Image path -> its (question, answer) pairs, in file order."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image in read_questions(folder):
        by_image[image].append((question, answer))
    return by_image


def question_type(answer: str) -> str:
    """shape, colour or yes/no: the question types easy-VQA's accuracy is reported by."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if attribute_kind(answer) == "shape" else "colour"


# ---------------------------------------------------------------- attributes


def attribute_kind(word: str) -> str | None:
    """"shape", "color", or None for a word that names neither."""
    return "shape" if word in SHAPES else "color" if word in COLORS else None


def image_attributes(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The shape and colour of one image ({"shape", "color"}, either may be missing), read
    from its questions and answers: "what color is the circle?" -> red names both, and
    "is there not a red shape?" -> no says the shape is red."""
    found: dict[str, str] = {}
    for question, answer in pairs:
        words = question.lower().rstrip("?").split()
        named = [w for w in words if attribute_kind(w)]
        if answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            present = named if (answer == "yes") != negated else []  # the named attribute is present
        else:
            present = [*named, answer]
        for word in present:
            found[attribute_kind(word)] = word
    return found


def flipped_yes_no(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The yes/no questions naming an absent attribute, asked about the present one instead
    ("is there a red shape?" no -> "is there a blue shape?" yes). easy-VQA asks mostly about
    absent colours, so "no" dominates its yes/no answers; these balance them, as POPE balances probes."""
    attributes = image_attributes(pairs)
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


def caption_of(attributes: dict[str, str]) -> str | None:
    """"a red circle", "a circle", "a red shape", or None when neither is known."""
    shape, color = attributes.get("shape"), attributes.get("color")
    if shape and color:
        return f"a {color} {shape}"
    if shape:
        return f"a {shape}"
    return f"a {color} shape" if color else None


def attributes_by_image(folder: Path) -> list[tuple[str, dict[str, str]]]:
    """(image path, its {"shape", "color"} as far as its questions tell) for every image."""
    return [(image, image_attributes(pairs)) for image, pairs in questions_by_image(folder).items()]


def full_captions(folder: Path) -> dict[str, list[str]]:
    """Caption -> the images it describes, for captions naming both colour and shape."""
    by_caption: dict[str, list[str]] = {}
    for image, found in attributes_by_image(folder):
        if "shape" in found and "color" in found:
            by_caption.setdefault(caption_of(found), []).append(image)
    return by_caption


# ---------------------------------------------------------------- training formats


def read_easy_vqa(split: str = "train", folder: str | Path | None = None, flip_yes_no: bool = False,
                  question_types: list[str] | None = None) -> list[Sample]:
    """One conversation per image: its questions in file order, the image in the first turn.

    `flip_yes_no`: instead, the flipped yes/no questions (`flipped_yes_no`).
    `question_types`: keep only questions of these types (`question_type`).
    """
    by_image = questions_by_image(easy_vqa_folder(split, folder))
    samples = []
    for image, pairs in by_image.items():
        pairs = flipped_yes_no(pairs) if flip_yes_no else pairs
        if question_types is not None:
            pairs = [(q, a) for q, a in pairs if question_type(a) in question_types]
        if not pairs:
            continue
        messages = []
        for turn, (question, answer) in enumerate(pairs):
            messages.append({"role": "user", "content": ("<image>\n" if turn == 0 else "") + question})
            messages.append({"role": "assistant", "content": answer})
        samples.append(Sample(Path(image).stem, messages, [image]))
    return samples


@register_dataset_format("easy-vqa", config=EasyVQAOptions)
def read_easy_vqa_format(options: EasyVQAOptions) -> list[Sample]:
    """easy-VQA questions, one conversation per image (the package's split or a folder)."""
    return read_easy_vqa(options.split, options.path, options.flip_yes_no, options.question_types)


def read_easy_vqa_captions(split: str = "train", folder: str | Path | None = None) -> list[Sample]:
    """Caption pairs ("a red triangle") derived from each image's easy-VQA questions; images
    whose questions reveal neither shape nor colour are left out."""
    return [caption_sample(Path(image).stem, image, caption)
            for image, found in attributes_by_image(easy_vqa_folder(split, folder))
            if (caption := caption_of(found)) is not None]


@register_dataset_format("easy-vqa-captions", config=EasyVQACaptionsOptions)
def read_easy_vqa_captions_format(options: EasyVQACaptionsOptions) -> list[Sample]:
    """easy-VQA images with captions derived from their questions ("a red triangle")."""
    return read_easy_vqa_captions(options.split, options.path)


def read_easy_vqa_speech(split: str = "train", folder: str | Path | None = None) -> list[Sample]:
    """(spoken caption, caption) samples: each distinct full caption in each voice of the split."""
    voices = VOICES["test" if split == "test" else "train"]
    samples = []
    for caption in sorted(full_captions(easy_vqa_folder(split, folder))):
        for voice, speed in voices:
            clip = speech_cache() / f"{voice}-{speed}" / f"{caption.replace(' ', '_')}.wav"
            speak(caption, voice, speed, clip)
            samples.append(caption_sample(f"{voice}-{speed}:{caption}", str(clip), caption))
    return samples


@register_dataset_format("easy-vqa-speech", config=EasyVQASpeechOptions)
def read_easy_vqa_speech_format(options: EasyVQASpeechOptions) -> list[Sample]:
    """easy-VQA captions spoken by espeak-ng (audio-text pairs), the split's own voices."""
    return read_easy_vqa_speech(options.split, options.path)

