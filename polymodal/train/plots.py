"""Loss curves as a picture, one line per stage."""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.model import atomic_write


def plot_losses(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in dict.fromkeys(row["stage"] for row in rows):
        points = [(offset + row["step"], row["loss"]) for row in rows if row["stage"] == stage]
        axis.plot(*zip(*points), marker=".", label=stage)
        offset = points[-1][0]
    axis.set(xlabel="optimizer step (all stages)", ylabel="loss", title="training loss")
    if rows:
        axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    try:  # atomic (model.atomic_write): a failed save keeps the last complete picture
        atomic_write(out, lambda temp: figure.savefig(temp, dpi=100, format="png"))
    finally:
        plt.close(figure)
