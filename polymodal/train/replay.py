"""Replay's answers: the model answers a replay dataset's questions as its stage begins.

A dataset format never runs the model (`data/replay.py` reads the questions); the training
run does, here, with the model the stage starts from: tuning LoRA adapters on image
questions bends how the LLM answers plain text, and its own earlier answers mixed into the
stage hold that behaviour in place (self-distillation; see data/replay.py for the why).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from polymodal.data.sample import Sample
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.safe_files import atomic_write

BATCH = 256  # questions answered together (the built-in list in one batch: faster than in batches of 64)


def answer_questions(model, questions: list[Sample], max_new_tokens: int,
                     cache_file: Path | None = None) -> list[Sample]:
    """Each question with the model's greedy answer. Answers still going at `max_new_tokens`
    are dropped: they have no end of turn to learn, and they are the rambling ones.

    `cache_file` (JSONL) keeps the answers: a resumed run must replay what the model said when
    the stage first began, not what its half-tuned self says now.

    Raises:
        UserError: no answer ended within `max_new_tokens` (the option to raise).
    """
    if cache_file is not None and cache_file.is_file():
        return [Sample(r["id"], r["messages"]) for r in map(json.loads, cache_file.read_text().splitlines())]
    was_training = model.training
    engine = Engine(model)  # greedy; LoRA folded in for the duration, restored exactly
    params = SamplingParams(max_new_tokens=max_new_tokens)
    answered = []
    with tqdm(total=len(questions), desc="replay: answering", unit="question", leave=False) as bar:
        for start in range(0, len(questions), BATCH):
            chunk = questions[start : start + BATCH]
            completions = engine.generate([{"messages": s.messages} for s in chunk], params)
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
        lines = "".join(json.dumps({"id": s.id, "messages": s.messages}) + "\n" for s in answered)
        atomic_write(cache_file, lambda p: p.write_text(lines))
    return answered
