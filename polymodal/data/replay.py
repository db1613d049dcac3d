"""`format: replay`: text-only questions, answered by the model itself as a stage begins.

Tuning LoRA adapters on image questions bends how the LLM answers plain text too: after the
easy-VQA recipe without replay, "What is the capital of France?" got "France" where the base
SmolLM2 says "The capital of France is Paris." Mixing the model's own earlier answers to other
text questions into the stage holds that behaviour in place (self-distillation): the role
LLaVA-1.5 gives to the text-only ShareGPT conversations in its instruction mix, for when no
such data is at hand. The answers are the model's, right or wrong: the point is to keep what
it did, not to teach it facts.

The questions: a text file, one per line (`#` starts a comment), or the built-in list
(`replay_questions.txt`, ~220 general questions, none of them "the capital of" one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from polymodal.config import DatasetConfig
from polymodal.data.errors import DataError, location
from polymodal.data.sample import Sample
from polymodal.errors import UserError
from polymodal.registry import register_dataset_format

BUILTIN_QUESTIONS = Path(__file__).with_name("replay_questions.txt")
BATCH = 256  # questions answered together (the built-in list in one batch: faster than in batches of 64)


@dataclass
class ReplayOptions(DatasetConfig):
    """Replay's questions (`path`: one per line; default: the built-in list), answered by the
    model as the stage begins."""

    format: str = "replay"
    max_new_tokens: int = 32  # the longest answer kept (longer ones are dropped)


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


def answer_questions(model, questions: list[Sample], max_new_tokens: int,
                     cache_file: Path | None = None) -> list[Sample]:
    """Each question with the model's greedy answer. Answers still going at `max_new_tokens`
    are dropped: they have no end of turn to learn, and they are the rambling ones.

    `cache_file` (JSONL) keeps the answers: a resumed run must replay what the model said when
    the stage first began, not what its half-tuned self says now.
    """
    if cache_file is not None and cache_file.is_file():
        return [Sample(r["id"], r["messages"]) for r in map(json.loads, cache_file.read_text().splitlines())]
    from polymodal.engine.generate import Generator
    from polymodal.engine.sampling import SamplingParams

    was_training = model.training
    generator = Generator(model)  # greedy; LoRA folded in for the duration, restored exactly
    params = SamplingParams(max_new_tokens=max_new_tokens)
    answered = []
    with tqdm(total=len(questions), desc="replay: answering", unit="question", leave=False) as bar:
        for start in range(0, len(questions), BATCH):
            chunk = questions[start : start + BATCH]
            completions = generator.generate([{"messages": s.messages} for s in chunk], params)
            for sample, completion in zip(chunk, completions):
                if completion.finish_reason == "stop" and completion.text.strip():
                    answer = {"role": "assistant", "content": completion.text.strip()}
                    answered.append(Sample(sample.id, [*sample.messages, answer]))
            bar.update(len(chunk))
    model.train(was_training)
    if not answered:
        raise UserError(f"replay: none of the model's {len(questions)} answers ended within "
                        f"max_new_tokens={max_new_tokens}; raise it, or this model cannot be replayed")
    if cache_file is not None:  # under DDP every process writes the same answers, atomically
        from polymodal.safe_files import atomic_write

        lines = "".join(json.dumps({"id": s.id, "messages": s.messages}) + "\n" for s in answered)
        atomic_write(cache_file, lambda p: p.write_text(lines))
    return answered
