"""Held-out measures during training: a validation loss and an eval task's headline metric,
taken every `validation.every` steps of a stage (config.ValidationConfig).

The loss is the stage objective's next-token loss (assistant tokens only) on held-out
samples, averaged over their label tokens (whatever the stage's `loss_average`); the metric is what `polymodal eval --task T --limit N`
reports, on the same fixed, seeded sample each time, so that points of one curve compare.
"""

from __future__ import annotations

import torch

from polymodal.config import ValidationConfig
from polymodal.errors import UserError
from polymodal.objectives.base import module_device
from polymodal.objectives.lm import LanguageModeling
from polymodal.train.mixture import encode_dataset


class Validator:
    """Measures one stage's model on its validation data and task (an `lm` stage's: the
    contrastive objective refuses `validation`)."""

    def __init__(self, objective: LanguageModeling):
        self.objective = objective
        self.config: ValidationConfig = objective.stage.validation
        # Held-out samples are checked and encoded as training ones are (bad ones skipped, not
        # listed: bad_samples.jsonl is the training data's).
        self.examples = [example for dataset in self.config.data
                         for example in encode_dataset(objective, dataset, None).samples]
        self.task, self.options, self.items = self._task_items()

    def _task_items(self):
        if self.config.task is None:
            return None, None, None
        from polymodal.eval.tasks import TaskOptions, get_task

        task = get_task(self.config.task)
        options = TaskOptions(split=self.config.task_split, data=self.config.task_data,
                              limit=self.config.task_limit)
        if not task.generative:
            raise UserError(f"validation.task: {task.name} is not a task a generative model answers")
        return task, options, task.items(options)

    def __call__(self, model) -> dict:
        """{"val_loss": mean loss per label token, "val_<metric>": the task's headline} of
        `model` (the objective's module)."""
        was_training = model.training
        model.eval()
        try:
            row = {"val_loss": self.loss()} if self.examples else {}
            if self.task is not None:
                metrics, _ = self.task.run(model, self.options, self.config.batch_size, self.items)
                row[f"val_{self.task.headline}"] = metrics[self.task.headline]
        finally:
            model.train(was_training)
        return row

    @torch.no_grad()
    def loss(self) -> float:
        """Mean next-token loss over every label token of the held-out examples."""
        total, tokens = 0.0, 0
        size = self.config.batch_size
        device = module_device(self.objective.module)
        for start in range(0, len(self.examples), size):
            batch = self.objective.batch(self.examples[start : start + size]).to(device)
            batch_total, batch_tokens = self.objective.summed_loss(batch)
            total += batch_total
            tokens += batch_tokens
        return total / max(tokens, 1)
