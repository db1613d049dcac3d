"""A validation split measured while training: held-out loss and a task's metric every N steps."""

import json

import pytest
from test_train import WORDS, recipe, synthetic_dataset

from polymodal.config import RecipeConfig, from_dict
from polymodal.errors import ConfigError
from polymodal.model import MultimodalLM
from polymodal.objectives.lm import LanguageModeling
from polymodal.train.run import train
from polymodal.train.validation import Validator


def vqa_file(folder) -> str:
    """Three VQA questions about the synthetic images, answered with their words."""
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "question": "What is this?",
                                        "answers": [WORDS[i]]}) + "\n" for i in range(3)))
    return str(path)


def test_validation_loss_and_metric_every_n_steps_in_the_metrics_and_the_picture(tmp_path):
    data = synthetic_dataset(tmp_path)
    validation = {"every": 2, "data": [{"format": "llava", "path": str(data), "limit": 4}],
                  "task": "vqa", "task_data": vqa_file(tmp_path), "batch_size": 3}
    config = recipe(data, ["connector", "llm"], steps=5, validation=validation)
    train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in measured] == [2, 4, 5]  # every 2 steps, and the stage's end
    assert all(0 <= row["val_soft_accuracy"] <= 1 for row in measured)
    assert all("loss" in row for row in rows if "val_loss" not in row)  # training rows unchanged
    # The last point is the saved model's held-out loss, computed again here.
    model = MultimodalLM.from_pretrained(tmp_path / "run" / "model")
    again = Validator(LanguageModeling(config.stages[0], model))(model)
    assert again["val_loss"] == pytest.approx(measured[-1]["val_loss"], rel=1e-5)
    assert again["val_soft_accuracy"] == measured[-1]["val_soft_accuracy"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_validation_needs_something_to_measure(tmp_path):
    stage = {"name": "s", "train": ["connector"], "lr": {"connector": 1e-3},
             "data": [{"format": "llava", "path": "d.json"}], "validation": {"every": 5}}
    with pytest.raises(ConfigError, match=r"validation\.data or task"):
        from_dict(RecipeConfig, {"name": "x", "model": {"llm": {"source": "tiny:llama"}}, "stages": [stage]})


def test_validation_is_refused_for_an_objective_without_a_held_out_loss():
    from polymodal.config import StageConfig

    stage = {"name": "s", "objective": "contrastive", "train": ["encoder"], "lr": {"encoder": 1e-3},
             "data": [{"format": "captions", "path": "c.jsonl"}],
             "validation": {"data": [{"format": "captions", "path": "v.jsonl"}]}}
    with pytest.raises(ConfigError, match="validation: objective contrastive measures no held-out loss"):
        from_dict(StageConfig, stage)
