"""TensorBoard event files beside metrics.jsonl (RUN_DIR/tensorboard/), what every trainer
of the field logs to: `tensorboard --logdir RUN_DIR/tensorboard`.

Each number of a logged row becomes a scalar at the row's global step (the x axis over all
stages), tagged by its name and stage: `loss/align`, `grad_norm/tune`,
`tokens_per_second/tune`, `learning_rate/tune/llm.lora` (one per parameter group),
`val_loss/tune`, `val_soft_accuracy/tune`. Written with torch's
`torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package); only rank 0 logs rows,
so only rank 0 writes.
"""

from __future__ import annotations

import sys
from numbers import Real
from pathlib import Path

NOT_SCALARS = ("stage", "step", "global_step", "lr")  # `lr` is in learning_rates, per group


class TensorBoard:
    """The run's event writer, opened by the first row written (so a process that logs
    nothing writes nothing)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.writer = None
        self.purge_step: int | None = None
        self.missing = False  # the tensorboard package is not installed: said once, then skipped

    def purge_after(self, global_step: int) -> None:
        """A resumed run: events a stopped run wrote after `global_step` (the checkpoint it
        resumes from) are dropped by TensorBoard, as metrics.jsonl drops their rows."""
        self.purge_step = global_step + 1

    def write(self, row: dict) -> None:
        """Every number in a metrics row {stage, step, global_step, ...} as a scalar."""
        writer = self._writer()
        if writer is None:
            return
        stage, step = row["stage"], row["global_step"]
        for name, value in row.items():
            if name == "learning_rates":
                for part, rate in value.items():
                    writer.add_scalar(f"learning_rate/{stage}/{part}", rate, step)
            elif name not in NOT_SCALARS and isinstance(value, Real) and not isinstance(value, bool):
                writer.add_scalar(f"{name}/{stage}", value, step)
        writer.flush()  # a run killed later keeps every row logged so far

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _writer(self):
        if self.writer is None and not self.missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.missing = True
                print("tensorboard is not installed (pip install tensorboard): no event files; "
                      "metrics.jsonl has every row", file=sys.stderr)
                return None
            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        return self.writer
