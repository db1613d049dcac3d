"""What a training stage optimises, behind one small Protocol.

The loop, the mixture and the run see only an `Objective`: which module the stage trains,
which of its parts, how a sample becomes an example and examples a batch, the loss and
what it counts. Each kind registers in `registry.OBJECTIVES` under the name a recipe's
`objective:` gives (`lm`, `contrastive`); `objective_for(stage, model)` builds the stage's.

A new objective is a class with the attributes and methods below, registered:

    @register_objective("my-objective")
    class MyObjective:
        unit = "pairs"
        ...

(the model-specific part of a step as a small "task" object: open_clip's
`src/open_clip/task/clip_task.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from polymodal.config import StageConfig
from polymodal.data.datasets import format_options
from polymodal.errors import ConfigError
from polymodal.registry import OBJECTIVES


@dataclass
class StepLoss:
    """One micro-batch's loss and its count."""

    loss: torch.Tensor  # a scalar: what the optimizer minimises
    count: int  # what the objective counts in this batch (`Objective.unit`): tokens read, pairs compared


class Objective(Protocol):
    """What one stage optimises; built for a stage and the run's model (`objective_for`)."""

    unit: ClassVar[str]  # what `StepLoss.count` counts ("tokens", "pairs"): rates and totals
    skip_reason: str  # why `example` gives None for a sample that passed the data checks
    placeholder: str  # what marks a medium in a sample's text (`<image>`): the data checks count it
    stage: StageConfig
    # What the stage trains: the model, or a module around a part of it; its `part_modules()`
    # names the parts a checkpoint keeps (train.checkpoint.trained_tensors).
    module: nn.Module

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        """Refuse (ConfigError naming the field) a stage's options this objective cannot
        use; fill in its own options' defaults. Runs when the recipe is parsed."""

    def set_trainable(self, module: nn.Module) -> None:
        """Train exactly the stage's parts of `module` (self.module, or its sharded copy)."""

    def parameter_groups(self, module: nn.Module) -> list[dict]:
        """AdamW parameter groups {params, lr, name} of `module`'s trainable parts."""

    def stage_context(self) -> AbstractContextManager:
        """Entered for the whole stage (e.g. LoRA adapters folded in while they are frozen)."""

    def example(self, sample, memo: dict) -> dict | None:
        """A checked `Sample` -> a compact training example (ids, media paths), or None when
        it cannot be used (`skip_reason`). `memo` is kept across one dataset's samples."""

    def batch(self, examples: list[dict]) -> Any:
        """Examples -> a typed batch for `module`'s forward (media loaded, or a frozen
        encoder's features from the objective's cache), with `.to(device)`."""

    def loss(self, forward: nn.Module, batch: Any) -> StepLoss:
        """Run `forward` (the module, or its DDP/FSDP wrapper) on the batch; its loss."""

    # Optional (`lm` has it): without it a stage's `validation:` is refused when the recipe
    # is parsed (StageConfig), so train.validation calls it only where it exists.
    def summed_loss(self, batch: Any) -> tuple[float, int]:
        """(summed loss, counted units) of `self.module` on a held-out batch, no gradients
        kept by the caller: `validation:`'s `val_loss` is their ratio over the data."""


class TrainsStageParts:
    """The `Objective` methods most kinds share: the stage's `train` parts of the module, one
    AdamW group (and learning rate) per part, nothing entered for the stage."""

    stage: StageConfig

    def set_trainable(self, module: nn.Module) -> None:
        module.set_trainable(self.stage.train)

    def parameter_groups(self, module: nn.Module) -> list[dict]:
        return [{"params": params, "lr": self.stage.lr[part], "name": part}
                for part, params in part_groups(module, self.stage) if params]

    def stage_context(self) -> AbstractContextManager:
        return nullcontext()


def refuse_lm_loss_options(stage: StageConfig) -> None:
    """Refuse the next-token loss's own options (`share_prefix`, `loss_average`) in a stage
    of another objective.

    Raises:
        ConfigError: naming the first such option the stage gives.
    """
    lm_only = [("share_prefix", stage.share_prefix is not None), ("loss_average", stage.loss_average != "token")]
    for name, given in lm_only:
        if given:
            raise ConfigError(f"{name}: only for objective lm")


def refuse_answered_data(stage: StageConfig) -> None:
    """Refuse data whose samples' answers are the model's own (`answered_by_model`, replay):
    only objective lm trains on the LLM's answers.

    Raises:
        ConfigError: naming the first such dataset's format.
    """
    answered = [dataset for dataset in stage.data if format_options(dataset).answered_by_model]
    if answered:
        raise ConfigError(f"data: format {answered[0].format} is for objective lm (it needs the LLM's answers)")


def objective_for(stage: StageConfig, model: nn.Module) -> Objective:
    """The objective a stage names (registry.OBJECTIVES), built for `model`."""
    return OBJECTIVES.get(stage.objective).builder(stage, model)


def part_parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    """A trainable part's parameters: a module of `model.part_modules()`, or `llm.lora`
    (the LoRA adapters of a multimodal LM's LLM)."""
    if part == "llm.lora":
        return [p for name, p in model.llm.named_parameters() if "lora_" in name]
    module = model.part_modules()[part]
    return list(module.parameters()) if module is not None else []


def part_groups(model: nn.Module, stage: StageConfig) -> Iterator[tuple[str, list[nn.Parameter]]]:
    """(part, its trainable parameters) for each part the stage trains, no tensor twice
    (`llm` already holds the adapters when both are named)."""
    seen: set[int] = set()
    for part in stage.train:
        params = [p for p in part_parameters(model, part) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        yield part, params


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for one without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def encoder_is_frozen(encoder: nn.Module | None) -> bool:
    """True when `encoder` exists and none of its weights train (set_trainable ran): its
    outputs can be cached for the stage."""
    return encoder is not None and not any(p.requires_grad for p in encoder.parameters())
