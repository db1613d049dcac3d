"""Objectives: a new kind registered in a test trains through the unchanged loop and run; the
loop, mixture and run branch on no objective and probe no model."""

import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import MODEL, synthetic_dataset
from torch import nn

from polymodal.config import RecipeConfig, StageConfig, from_dict
from polymodal.errors import ConfigError
from polymodal.model import MultimodalLM
from polymodal.objectives import StepLoss
from polymodal.processing.images import load_image
from polymodal.registry import OBJECTIVES, register_objective
from polymodal.train.run import train


class ColourHead(nn.Module):
    """The model's own image encoder and a new linear head: an image's mean colour [B, 3]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, 3)

    def part_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "head": self.head}

    def set_trainable(self, parts: list[str]) -> None:
        for name, module in self.part_modules().items():
            module.requires_grad_(name in parts)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels).mean(1))


@register_objective("test-mean-colour")
class MeanColour:
    """Regress each image's mean colour from the encoder (a made-up pretext task)."""

    unit = "images"
    skip_reason = "not one image"
    placeholder = "<image>"

    def __init__(self, stage: StageConfig, model: nn.Module):
        self.check(stage)
        self.stage = stage
        torch.manual_seed(stage.seed)
        self.module = ColourHead(model.encoder)

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        if stage.share_prefix is not None:
            raise ConfigError("share_prefix: not for objective test-mean-colour")

    def set_trainable(self, module):
        module.set_trainable(self.stage.train)

    def parameter_groups(self, module):
        return [{"params": list(module.part_modules()[part].parameters()), "lr": self.stage.lr[part], "name": part}
                for part in self.stage.train]

    def stage_context(self):
        return nullcontext()

    def example(self, sample, memo):
        return {"image": sample.images[0]} if len(sample.images) == 1 else None

    def batch(self, examples):
        return torch.stack([load_image(e["image"], 32) for e in examples])  # a tensor has .to(device)

    def loss(self, forward, batch):
        return StepLoss(F.mse_loss(forward(batch), batch.mean((2, 3))), len(batch))


def colour_recipe(path, **stage) -> RecipeConfig:
    return from_dict(RecipeConfig, {"name": "colour", "model": MODEL, "stages": [
        {"name": "colour", "objective": "test-mean-colour", "train": ["encoder", "head"],
         "lr": {"encoder": 3e-3, "head": 3e-2}, "steps": 30, "batch_size": 8, "log_every": 5,
         "data": [{"format": "llava", "path": str(path)}], **stage}]})


def test_an_objective_registered_elsewhere_trains_through_the_unchanged_loop(tmp_path):
    config = colour_recipe(synthetic_dataset(tmp_path))
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config)
    llm_before = {name: p.clone() for name, p in model.llm.named_parameters()}
    encoder_before = {name: p.clone() for name, p in model.encoder.named_parameters()}
    summary = train(config, tmp_path / "run", model)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 2 and "images_per_second" in rows[0]
    assert summary["stages"]["colour"]["images"] == 30 * 8  # the objective's own count
    # The encoder learned and was saved with the model; the LLM was never touched.
    assert any(not torch.equal(p, encoder_before[n]) for n, p in model.encoder.named_parameters())
    assert all(torch.equal(p, llm_before[n]) for n, p in model.llm.named_parameters())
    saved = MultimodalLM.from_pretrained(tmp_path / "run" / "model")
    assert all(torch.equal(p, dict(model.encoder.named_parameters())[n]) for n, p in saved.encoder.named_parameters())


def test_the_objective_checks_its_options_when_the_recipe_is_parsed(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.share_prefix: not for objective test-mean-colour"):
        colour_recipe(tmp_path / "data.json", share_prefix=4)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.objective: unknown objective 'nope'; known: .*lm"):
        from_dict(RecipeConfig, {"name": "x", "model": MODEL, "stages": [
            {"name": "a", "objective": "nope", "train": ["connector"], "lr": {"connector": 1e-3},
             "data": [{"format": "llava", "path": "d.json"}]}]})
    assert {"lm", "contrastive", "test-mean-colour"} <= set(OBJECTIVES.names())


def test_the_loop_mixture_and_run_see_only_the_objective():
    """No probing of the model (hasattr/getattr) and no branch on an objective's name in train/."""
    train_dir = Path(__file__).parents[2] / "polymodal" / "train"
    for path in train_dir.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b(hasattr|getattr)\(", text), path.name
        assert not re.search(r"objective\s*[!=]=", text), path.name
