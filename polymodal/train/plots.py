"""Loss curves as a picture: one line per stage, validation dashed."""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.safe_files import atomic_write


def plot_losses(metrics: Path, out: Path) -> None:
    """Training loss per stage against the optimizer step over all stages; where a stage
    validates, its `val_loss` dashed and its task metric (`val_<metric>`) on a right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    figure, axis = plt.subplots(figsize=(7, 4))
    metric_axis = None
    offset = 0
    for stage in dict.fromkeys(row["stage"] for row in rows):
        mine = [row for row in rows if row["stage"] == stage]
        points = [(offset + row["step"], row["loss"]) for row in mine if "loss" in row]
        if not points:
            continue
        line, = axis.plot(*zip(*points), marker=".", label=stage)
        validation = [(offset + row["step"], row["val_loss"]) for row in mine if "val_loss" in row]
        if validation:
            axis.plot(*zip(*validation), linestyle="--", marker="o", color=line.get_color(),
                      label=f"{stage}: validation")
        for name in sorted({key for row in mine for key in row if key.startswith("val_")} - {"val_loss"}):
            metric_axis = metric_axis or axis.twinx()
            values = [(offset + row["step"], row[name]) for row in mine if name in row]
            metric_axis.plot(*zip(*values), linestyle=":", marker="s", color=line.get_color(),
                             label=f"{stage}: {name}")
            metric_axis.set_ylabel("validation metric")
        offset = points[-1][0]
    axis.set(xlabel="optimizer step (all stages)", ylabel="loss", title="training loss")
    if rows:
        handles, labels = axis.get_legend_handles_labels()
        if metric_axis is not None:
            extra = metric_axis.get_legend_handles_labels()
            handles, labels = handles + extra[0], labels + extra[1]
        axis.legend(handles, labels, fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    try:  # atomic (safe_files.atomic_write): a failed save keeps the last complete picture
        atomic_write(out, lambda temp: figure.savefig(temp, dpi=100, format="png"))
    finally:
        plt.close(figure)
