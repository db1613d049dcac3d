"""Pictures of evaluation results."""

from __future__ import annotations

from pathlib import Path


def plot_confusion(labels: list[str], counts: list[list[int]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(counts)
    figure, axis = plt.subplots(figsize=(1 + 0.5 * len(labels), 1 + 0.5 * rows))
    axis.imshow(counts, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    axis.set_yticks(range(rows), labels[:rows])
    axis.set(xlabel="prediction", ylabel="reference", title=title)
    for r, row in enumerate(counts):
        for c, value in enumerate(row):
            if value:
                axis.text(c, r, str(value), ha="center", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
