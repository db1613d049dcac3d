"""What every dataset format reads into: a training `Sample` (a conversation and its media)
or an evaluation `Item` (one question and its accepted answers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.processing.processor import with_placeholders


@dataclass
class Sample:
    """One training conversation.

    `messages`: [{"role", "content"}], `<image>` where each image goes; `images`: media paths
    in placeholder order; `problem`: why the record cannot be used, found while reading it
    (the sample is then listed as bad, not trained on); `where`: the record's place in its
    file (`data.jsonl:12`, `data.json, record 3 (id 'a17')`; see data.errors.location), for
    messages about it.
    """

    id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    problem: str | None = None
    where: str | None = None
    # Other modalities' media paths ({"audio": [clip]}), each in its placeholder's order.
    media: dict[str, list[str]] = field(default_factory=dict)
    # Images the assistant draws (a model with `image_output`): the last assistant turn's
    # answer starts with this one image's block of codes (objectives/lm.py splices it in).
    draws: list[str] = field(default_factory=list)

    def media_paths(self) -> list[str]:
        """Every media path: the images, the other modalities', then the images drawn."""
        return [*self.images, *(path for paths in self.media.values() for path in paths), *self.draws]


@dataclass
class Item:
    """One question to the model, for evaluation."""

    id: str
    question: str  # the text after the image placeholders
    images: list  # paths, PIL images or pixel tensors [3, S, S]
    references: list[str]  # accepted answers (captions for `caption`)
    info: dict = field(default_factory=dict)  # kept in predictions.jsonl: type, setting, rotation, ...
    media: dict[str, list] = field(default_factory=dict)  # other modalities' ({"audio": [clip]})

    def prompt(self, placeholder: str = "<image>") -> dict:
        """A chat prompt: the question, after one placeholder per image unless it marks them
        (other modalities' placeholders likewise go before the text unless it marks them)."""
        content = with_placeholders(self.question, len(self.images), placeholder)
        return {"messages": [{"role": "user", "content": content}], "images": list(self.images),
                "media": {modality: list(items) for modality, items in self.media.items()}}


def split_turns(sample: Sample, turns: int, placeholder: str = "<image>") -> list[Sample]:
    """A one-image conversation cut into parts of at most `turns` user/assistant exchanges,
    the image placed at the start of each part; others (system turns, several images, other
    modalities' media, whose placeholders sit in particular turns) stay whole."""
    messages = sample.messages
    roles = [m["role"] for m in messages]
    if len(sample.images) != 1 or sample.media or "system" in roles or roles[::2] != ["user"] * len(roles[::2]) \
            or roles[1::2] != ["assistant"] * len(roles[1::2]) or len(messages) <= 2 * turns:
        return [sample]
    parts = []
    for start in range(0, len(messages), 2 * turns):
        chunk = [dict(m) for m in messages[start : start + 2 * turns]]
        for message in chunk:
            message["content"] = message["content"].replace(placeholder, "").lstrip("\n")
        chunk[0]["content"] = f"{placeholder}\n{chunk[0]['content']}"
        parts.append(Sample(f"{sample.id}#{start // 2}", chunk, list(sample.images), where=sample.where))
    return parts
