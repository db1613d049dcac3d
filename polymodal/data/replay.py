"""`format: replay`: text-only questions, answered by the model itself as a stage begins.

Tuning LoRA adapters on image questions bends how the LLM answers plain text too: after the
easy-VQA recipe without replay, "What is the capital of France?" got "France" where the base
SmolLM2 says "The capital of France is Paris." Mixing the model's own earlier answers to other
text questions into the stage holds that behaviour in place (self-distillation): the role
LLaVA-1.5 gives to the text-only ShareGPT conversations in its instruction mix, for when no
such data is at hand. The answers are the model's, right or wrong: the point is to keep what
it did, not to teach it facts.

The training run answers them (train/replay.py); a format only reads. The questions: a
text file, one per line (`#` starts a comment), or the built-in list
(`replay_questions.txt`, ~220 general questions, none of them "the capital of" one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from polymodal.config import DatasetConfig
from polymodal.data.errors import DataError, location
from polymodal.data.sample import Sample
from polymodal.errors import ConfigError
from polymodal.registry import register_dataset_format

BUILTIN_QUESTIONS = Path(__file__).with_name("replay_questions.txt")


@dataclass
class ReplayOptions(DatasetConfig):
    """Replay's questions (`path`: one per line; default: the built-in list), answered by the
    model as the stage begins."""

    format: str = "replay"
    max_new_tokens: int = 32  # the longest answer kept (longer ones are dropped)
    answered_by_model: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")


def read_questions(path: str | Path | None = None) -> list[Sample]:
    """The questions as one-turn samples without an answer yet; each sample's `where` is its line."""
    path = Path(path) if path else BUILTIN_QUESTIONS
    if not path.is_file():
        raise DataError("replay questions file not found", path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    questions = [(number, line) for number, line in enumerate(lines, start=1) if line and not line.startswith("#")]
    if not questions:
        raise DataError("no questions (one per line; '#' starts a comment)", path)
    return [Sample(f"replay-{i}", [{"role": "user", "content": q}], where=location(path, line=number))
            for i, (number, q) in enumerate(questions)]


@register_dataset_format("replay", config=ReplayOptions)
def read_replay(options: ReplayOptions) -> list[Sample]:
    """Text questions the model answers itself as the stage begins (self-distillation)."""
    return read_questions(options.path)  # answered by the training run, not here
