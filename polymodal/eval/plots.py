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


def plot_grouped_bars(groups: dict[str, dict[str, float]], out: Path, title: str,
                      ylabel: str = "") -> None:
    """One group of bars per key of `groups`, one bar per inner metric, values printed on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(key for values in groups.values() for key in values))
    width = 0.8 / max(1, len(metrics))
    import textwrap

    figure, axis = plt.subplots(figsize=(2 + len(groups) * max(1.3, 0.5 * len(metrics)), 3.8))
    for index, metric in enumerate(metrics):
        xs = [g + (index - (len(metrics) - 1) / 2) * width for g in range(len(groups))]
        values = [groups[name].get(metric, 0.0) for name in groups]
        bars = axis.bar(xs, values, width, label=metric)
        axis.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=6)
    axis.set_xticks(range(len(groups)), [textwrap.fill(name, 12) for name in groups], fontsize=8)
    axis.set(title=title, ylabel=ylabel)
    axis.set_ylim(0, max(1.05, *(v for g in groups.values() for v in g.values())) * 1.05)
    if len(metrics) > 1:
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics), frameon=False)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
