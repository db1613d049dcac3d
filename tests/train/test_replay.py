"""`format: replay`: the model's own answers to text questions hold them in place while it tunes on images."""

import json

import pytest
from test_train import MODEL, synthetic_dataset

from polymodal.config import RecipeConfig, StageConfig, from_dict
from polymodal.data.replay import BUILTIN_QUESTIONS, read_questions
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import ConfigError, UserError
from polymodal.model import MultimodalLM
from polymodal.train.replay import answer_questions
from polymodal.train.run import train

QUESTIONS = ["Name a fruit.", "Name a colour.", "Say hi.", "Count to two."]
TAUGHT = ["pear", "blue", "hi", "one two"]


def stage(name, parts, steps, data):
    return {"name": name, "train": parts, "lr": dict.fromkeys(parts, 3e-3), "steps": steps,
            "batch_size": 8, "log_every": 5, "data": data}


def text_then_images(tmp_path, replay: bool) -> RecipeConfig:
    """Stage 1 teaches short text answers (so the tiny model ends its answers); stage 2 then
    trains the whole model on 8 image/word pairs, with or without replaying stage 1's questions."""
    conversations = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                     for i, (q, a) in enumerate(zip(QUESTIONS, TAUGHT))]
    (tmp_path / "text.json").write_text(json.dumps(conversations))
    (tmp_path / "questions.txt").write_text("# taught in stage 1\n" + "\n".join(QUESTIONS))
    images = [{"format": "llava", "path": str(synthetic_dataset(tmp_path))}]
    if replay:
        images.append({"format": "replay", "path": str(tmp_path / "questions.txt"), "weight": 0.4})
    return from_dict(RecipeConfig, {"name": "test", "model": MODEL, "stages": [
        stage("text", ["llm"], 40, [{"format": "llava", "path": str(tmp_path / "text.json")}]),
        stage("images", ["encoder", "connector", "llm"], 60, images)]})


def text_answers(model) -> dict[str, str]:
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    completions = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8))
    return {q: c.text for q, c in zip(QUESTIONS, completions)}


@pytest.mark.parametrize("replay", [True, False])
def test_replay_keeps_the_text_answers_a_stage_began_with(tmp_path, replay):
    train(text_then_images(tmp_path, replay), tmp_path / "run")
    after = text_answers(MultimodalLM.from_pretrained(tmp_path / "run" / "model"))
    if not replay:  # the control: tuning on images alone bends the text answers
        assert not (tmp_path / "run" / "replay-images-1.jsonl").exists()
        assert sum(after[q] == a for q, a in zip(QUESTIONS, TAUGHT)) <= 1
        return
    rows = [json.loads(line) for line in (tmp_path / "run" / "replay-images-1.jsonl").read_text().splitlines()]
    replayed = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert len(replayed) >= 2  # the answers that ended within max_new_tokens
    assert {q: after[q] for q in replayed} == replayed


def test_answers_are_cached_and_unfinished_ones_dropped(tmp_path, monkeypatch):
    from polymodal.engine.generate import Completion

    model = MultimodalLM.from_config(from_dict(RecipeConfig, {"name": "t", "model": MODEL}))
    model.train()
    calls = []

    def fake_generate(self, prompts, params):
        calls.append(len(prompts))
        return [Completion("a long answer", [1] * 8, "length", 5), Completion(" Paris. ", [1, 2], "stop", 5),
                Completion("  ", [1], "stop", 5)][: len(prompts)]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    questions = read_questions(None)[:3]
    cache = tmp_path / "replay.jsonl"
    answered = answer_questions(model, questions, 8, cache)
    assert [s.messages[-1] for s in answered] == [{"role": "assistant", "content": "Paris."}]
    assert model.training and calls == [3]  # training mode restored after generating
    again = answer_questions(model, questions, 8, cache)  # a resumed run replays the cached answers
    assert calls == [3] and [s.messages for s in again] == [s.messages for s in answered]


def test_replay_input_errors(tmp_path, monkeypatch):
    questions = read_questions(BUILTIN_QUESTIONS)
    assert len(questions) > 200
    assert not any("capital of" in s.messages[0]["content"].lower() for s in questions)  # held out
    with pytest.raises(UserError, match="not found"):
        read_questions(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="no questions"):
        read_questions(tmp_path / "empty.txt")
    model = MultimodalLM.from_config(from_dict(RecipeConfig, {"name": "t", "model": MODEL}))
    with pytest.raises(UserError, match="none of the model's 2 answers ended"):  # a random model rambles
        answer_questions(model, questions[:2], 4)
    with pytest.raises(ConfigError, match="replay is for objective lm"):
        from_dict(StageConfig, {"name": "v", "objective": "contrastive", "train": ["encoder"],
                                "lr": {"encoder": 1e-3}, "data": [{"format": "replay"}]})
    with pytest.raises(ConfigError, match="max_new_tokens: must be at least 1, got 0"):
        from_dict(StageConfig, {"name": "v", "train": ["llm"], "lr": {"llm": 1e-3},
                                "data": [{"format": "replay", "max_new_tokens": 0}]})


def test_a_fresh_run_asks_its_own_model_again(tmp_path):
    """The answers kept in a run directory serve --resume only: a fresh run into the same
    directory (perhaps with another LLM) must not replay the last run's answers."""
    from polymodal.train.distributed import SINGLE_PROCESS
    from polymodal.train.run import Run

    stale = tmp_path / "run" / "replay-images-1.jsonl"
    stale.parent.mkdir()
    stale.write_text('{"id": "replay-0", "messages": []}\n')
    Run(text_then_images(tmp_path, replay=True), tmp_path / "run", resume=False, world=SINGLE_PROCESS)
    assert not stale.exists()
