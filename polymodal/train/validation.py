"""Held-out measures during training: a validation loss and an eval task's headline metric,
taken every `validation.every` steps of a stage (config.ValidationConfig).

The loss is the training loss (next-token, assistant tokens only) on held-out samples,
averaged over their label tokens; the metric is what `polymodal eval --task T --limit N`
reports, on the same fixed, seeded sample each time, so that points of one curve compare.
"""

from __future__ import annotations

import torch

from polymodal.config import StageConfig, ValidationConfig
from polymodal.errors import UserError


class Validator:
    """Measures one stage's model on its validation data and task; `None` rows are skipped."""

    def __init__(self, model, stage: StageConfig):
        from polymodal.train.mixture import encode_dataset

        self.config: ValidationConfig = stage.validation
        # Held-out samples are checked and encoded as training ones are (bad ones skipped, not
        # listed: bad_samples.jsonl is the training data's).
        self.examples = [example for dataset in self.config.data
                         for example in encode_dataset(model, dataset, stage, None).samples]
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
        """{"val_loss": mean loss per label token, "val_<metric>": the task's headline}."""
        was_training = model.training
        model.eval()
        try:
            row = {"val_loss": self.loss(model)} if self.examples else {}
            if self.task is not None:
                metrics, _ = self.task.run(model, self.options, self.config.batch_size, self.items)
                row[f"val_{self.task.headline}"] = metrics[self.task.headline]
        finally:
            model.train(was_training)
        return row

    @torch.no_grad()
    def loss(self, model) -> float:
        """Mean next-token loss over every label token of the held-out examples."""
        total, tokens = 0.0, 0
        size = self.config.batch_size
        for start in range(0, len(self.examples), size):
            output = model(model.training_batch(self.examples[start : start + size]))
            total += float(output.loss) * output.num_label_tokens  # the loss is a mean per token
            tokens += output.num_label_tokens
        return total / max(tokens, 1)
