"""Does the LLM help? Series classification and forecasting with and without it (issue 19 §2).

For aeon's bundled BasicMotions, GunPoint and PickupGestureWiimoteZ (classification: test
accuracy) and Airline (forecasting 12 months from 36: test MASE), each arm of
benchmarks/series_arms.py (frozen SmolLM2 + LoRA; the same with random LLM weights; PAttn,
one attention layer in the LLM's place; the encoder and a linear head; MiniRocket or the
seasonal naive forecast) trains for the same wall-clock budget, with several seeds, and is
scored on the held-out test split. Printed: a markdown table (score mean ± std over seeds,
parameters trainable/total, training seconds, steps, inference ms per series), then one
JSON line with every mean and the LLM arm's ratios to the others. Written to --out:
results.jsonl (one line per run), table.md, and the bar chart (--plot).

    python benchmarks/series_llm.py [--budget 20] [--seeds 0 1 2] [--sets ...] [--arms ...]

Run it alone (`flock /tmp/cpu.lock ...` here): the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from series_arms import ARMS, Outcome, load_task, minirocket_process, run_arm
from tqdm import tqdm

SETS = ("BasicMotions", "GunPoint", "PickupGestureWiimoteZ", "Airline")
LABELS = {"llm": "SmolLM2 + LoRA", "llm-random": "random-weight LLM + LoRA", "pattn": "PAttn (1 attention layer)",
          "linear": "no LLM (linear head)", "baseline": "MiniRocket / seasonal naive"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds per run (wall clock)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="aeon bundled sets")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/series-llm", help="folder for results.jsonl and table.md")
    parser.add_argument("--plot", default="docs/images/series-llm.png", help="where the bar chart goes")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace, results: Path) -> list[Outcome]:
    """Every set x seed x arm, each line appended to `results` as it finishes."""
    outcomes = []
    runs = [(name, seed, arm) for name in args.sets for seed in args.seeds for arm in args.arms]
    tasks = {}
    with results.open("w") as out, tqdm(runs, desc="runs", unit="run") as progress:
        for name, seed, arm in progress:
            progress.set_postfix_str(f"{name} {arm} seed {seed}")
            task = tasks.setdefault(name, load_task(name))
            outcome = run_arm(task, arm, seed, args.budget)
            outcomes.append(outcome)
            out.write(json.dumps(vars(outcome)) + "\n")
            out.flush()
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict:
    """{set: {arm: {mean, std, trainable, total, train_seconds, steps, infer_ms, metric}}}."""
    table: dict = {}
    for outcome in outcomes:
        table.setdefault(outcome.set, {}).setdefault(outcome.arm, []).append(outcome)
    summary = {}
    for name, arms in table.items():
        summary[name] = {}
        for arm, runs in arms.items():
            scores = [run.score for run in runs]
            summary[name][arm] = {
                "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "trainable": runs[0].trainable, "total": runs[0].total, "runs": len(runs),
                "train_seconds": statistics.fmean(run.train_seconds for run in runs),
                "steps": statistics.fmean(run.steps for run in runs),
                "infer_ms": statistics.fmean(run.infer_ms for run in runs)}
    return summary


def is_forecast(name: str) -> bool:
    return name == "Airline"


def markdown_table(summary: dict) -> str:
    """One row per set and arm: score mean ± std, parameters, seconds, steps, ms per series."""
    lines = ["| set | arm | accuracy / MASE | trainable / total params | train s | steps | infer ms/series |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, arms in summary.items():
        metric = "MASE" if is_forecast(name) else "acc"
        for arm, row in arms.items():
            score = (f"{row['mean']:.3f} ± {row['std']:.3f}" if is_forecast(name)
                     else f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f} %")
            lines.append(f"| {name} ({metric}) | {LABELS[arm]} | {score} | {_count(row['trainable'])} / "
                         f"{_count(row['total'])} | {row['train_seconds']:.1f} | {row['steps']:.0f} | "
                         f"{row['infer_ms']:.2f} |")
    return "\n".join(lines)


def _count(number: int) -> str:
    if number >= 1e6:
        return f"{number / 1e6:.1f}M"
    return f"{number / 1e3:.1f}k" if number >= 1e3 else str(number)


def ratios(summary: dict) -> dict:
    """Per set, the LLM arm's mean score over each other arm's (MASE: lower is better, so a
    ratio above 1 means the LLM forecasts worse; accuracy: above 1, better)."""
    out = {}
    for name, arms in summary.items():
        if "llm" in arms:
            out[name] = {f"llm/{arm}": round(arms["llm"]["mean"] / row["mean"], 3)
                         for arm, row in arms.items() if arm != "llm" and row["mean"]}
    return out


def plot(summary: dict, budget: float, path: Path) -> None:
    """A bar chart per set: each arm's mean score with its std over seeds as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
    colours = {"llm": "#c44e52", "llm-random": "#dd8452", "pattn": "#55a868", "linear": "#4c72b0", "baseline": "#8c8c8c"}
    for axis, name in zip(axes[0], names):
        arms = list(summary[name])
        means = [summary[name][arm]["mean"] * (1 if is_forecast(name) else 100) for arm in arms]
        stds = [summary[name][arm]["std"] * (1 if is_forecast(name) else 100) for arm in arms]
        axis.bar(range(len(arms)), means, yerr=stds, capsize=3, color=[colours[arm] for arm in arms])
        axis.set_xticks(range(len(arms)), [LABELS[arm].split(" (")[0].replace(" / ", "/\n") for arm in arms],
                        rotation=40, ha="right", fontsize=8)
        axis.set_title(name, fontsize=10)
        axis.set_ylabel("test MASE (lower is better)" if is_forecast(name) else "test accuracy %")
        if not is_forecast(name):
            axis.set_ylim(0, 100)
    figure.suptitle(f"Equal training time: {budget:g} s per run (mean ± std over seeds)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if "baseline" in args.arms:
        minirocket_process()  # started and compiled before any arm is timed
    outcomes = run_all(args, out / "results.jsonl")
    summary = summarise(outcomes)
    table = markdown_table(summary)
    (out / "table.md").write_text(table + "\n")
    plot(summary, args.budget, Path(args.plot))
    print(table)
    print(json.dumps({"study": "series_llm", "date": date.today().isoformat(), "machine": platform.processor()
                      or platform.machine(), "threads": args.threads, "budget_s": args.budget, "seeds": args.seeds,
                      "total_s": round(time.perf_counter() - started, 1), "summary": summary,
                      "ratios": ratios(summary)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
