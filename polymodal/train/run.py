"""A training run: the stages of a recipe in order, and the run directory they fill.

RUN_DIR/
  recipe.yaml        the resolved recipe (overrides applied)
  metrics.jsonl      one line per logged step
  bad_samples.jsonl  samples skipped by the up-front check, with reasons
  loss.png           loss curves, one per stage
  summary.json       train_seconds (total and per stage), samples, tokens, final loss
  model/             the final model (MultimodalLM.from_pretrained reads it)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from polymodal.config import RecipeConfig, to_dict
from polymodal.errors import UserError
from polymodal.model import MultimodalLM, atomic_write
from polymodal.train.loop import train_stage
from polymodal.train.mixture import Mixture, encode_dataset
from polymodal.train.plots import plot_losses


def train(recipe: RecipeConfig, run_dir: str | Path, model: MultimodalLM | None = None) -> dict:
    """Train every stage of `recipe` into `run_dir`; returns the summary."""
    if not recipe.stages:
        raise UserError(f"recipe {recipe.name!r} has no stages to train")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "recipe.yaml", lambda p: p.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False)))
    model = model or MultimodalLM.from_config(recipe)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    (run_dir / "bad_samples.jsonl").unlink(missing_ok=True)

    def log(row: dict) -> None:
        with open(metrics, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    summary = {"recipe": recipe.name, "stages": {}, "train_seconds": 0.0, "samples": 0, "tokens": 0}
    started = time.perf_counter()
    for stage in recipe.stages:
        datasets = [encode_dataset(model, d, stage, run_dir / "bad_samples.jsonl") for d in stage.data]
        mixture = Mixture(datasets, stage.batch_size, stage.seed)
        if len(mixture) == 0:
            raise UserError(f"stage {stage.name!r}: no usable samples")
        stage_started = time.perf_counter()
        totals = train_stage(model, stage, mixture, log)
        totals["train_seconds"] = time.perf_counter() - stage_started
        totals["skipped_too_long"] = sum(d.skipped_too_long for d in datasets)
        summary["stages"][stage.name] = totals
        summary["samples"] += totals["samples"]
        summary["tokens"] += totals["tokens"]
        summary["final_loss"] = totals["final_loss"]
    summary["train_seconds"] = time.perf_counter() - started
    model.save_pretrained(run_dir / "model")
    plot_losses(metrics, run_dir / "loss.png")
    atomic_write(run_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return summary
