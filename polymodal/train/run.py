"""A training run: the stages of a recipe in order, and the run directory they fill.

RUN_DIR/
  recipe.yaml        the resolved recipe (overrides applied)
  metrics.jsonl      one line per logged step
  bad_samples.jsonl  samples skipped (bad or too long), each with its reason, once
  fingerprints.json  each stage's data as it began (mixture.fingerprint): --resume checks it
  replay-*.jsonl     a replay dataset's answers, as the model gave them when its stage began
  checkpoints/       resumable checkpoints (see checkpoint.py)
  loss.png           loss curves, one per stage
  tensorboard/       the same curves as TensorBoard events: loss per stage, learning rates, validation
  summary.json       train_seconds (total and per stage), samples, tokens, final loss
  model/             the final model (build.load_model reads it)
  .lock              held by the one `train` writing here (see polymodal/locks.py)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from polymodal.build import build_model
from polymodal.config import RecipeConfig
from polymodal.errors import UserError
from polymodal.locks import exclusive
from polymodal.objectives import Objective, objective_for
from polymodal.safe_files import atomic_write
from polymodal.train import checkpoint, distributed, replaced
from polymodal.train.distributed import World
from polymodal.train.fit_sizes import fit_encoder_sizes
from polymodal.train.loop import train_stage
from polymodal.train.mixture import Mixture, encode_dataset, read_dataset
from polymodal.train.plots import plot_losses
from polymodal.train.run_files import (
    comparable_recipe,
    recipe_text,
    refuse_to_replace,
    remove_stale_temps,
    save_model,
    writing,
)
from polymodal.train.tensorboard import TensorBoard
from polymodal.train.validation import Validator

LOCK = ".lock"  # in the run directory: held by the one `train` writing it


class Run:
    """The run directory's files, and where in the recipe the run stands."""

    def __init__(self, recipe: RecipeConfig, run_dir: Path, resume: bool, world: World):
        self.recipe, self.dir, self.world = recipe, run_dir, world
        self.metrics = run_dir / "metrics.jsonl"
        self.bad_samples = run_dir / "bad_samples.jsonl"
        self.checkpoints = run_dir / "checkpoints"
        self.fingerprints = run_dir / "fingerprints.json"  # the data each stage began with
        self.tensorboard = TensorBoard(run_dir / "tensorboard")  # opened by the first row rank 0 logs
        self.summary = {"recipe": recipe.name, "stages": {}, "train_seconds": 0.0,
                        "samples": 0, "tokens": 0, "final_loss": None, "processes": world.size,
                        "parallel": recipe.parallel if world.size > 1 else None}
        self.position = (0, 0)  # (stage index, steps done in it)
        self.resume_from = self._usable_checkpoint() if resume else None
        text = recipe_text(recipe)
        if resume:
            self._check_same_recipe(text)
        if not world.is_main:
            return  # only rank 0 writes
        if not resume:  # a fresh run replaces the last one's files, so --resume never mixes them
            # (replay answers too: a fresh run asks its own model, which may differ from the last's);
            # set aside, not deleted, until the new run has a checkpoint of its own (train.replaced)
            replaced.set_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with writing(run_dir / "recipe.yaml", self.checkpoints):
            atomic_write(run_dir / "recipe.yaml", lambda p: p.write_text(text))

    def _usable_checkpoint(self) -> Path | None:
        """The newest checkpoint that reads back whole; a damaged newer one is skipped, and
        said so (it stays on disk, replaced when the run saves that step again)."""
        found, skipped = checkpoint.latest_usable(self.checkpoints)
        if found is None and skipped:
            raise UserError(f"--resume: no usable checkpoint in {self.checkpoints}: {'; '.join(skipped)}")
        if skipped and self.world.is_main:
            print(f"{'; '.join(skipped)}; resuming from {found.name}", file=sys.stderr)
        return found

    def _check_same_recipe(self, text: str) -> None:
        if self.resume_from is None:
            raise UserError(f"--resume: no complete checkpoint in {self.checkpoints}")
        saved = self.dir / "recipe.yaml"
        if saved.is_file() and saved.read_text() != text and \
                comparable_recipe(saved.read_text()) != comparable_recipe(text):
            raise UserError(f"--resume: the recipe differs from the run's {saved}")
        meta = checkpoint.read_meta(self.resume_from)
        self.position = (meta["stage_index"], meta["step"])
        self.summary = meta["summary"]
        self._drop_metrics_after(meta["global_step"])
        self.tensorboard.purge_after(meta["global_step"])

    def _drop_metrics_after(self, global_step: int) -> None:
        if self.world.is_main and self.metrics.is_file():
            rows = [json.loads(line) for line in self.metrics.read_text().splitlines()]
            kept = "".join(json.dumps(r) + "\n" for r in rows if r["global_step"] <= global_step)
            with writing(self.metrics, self.checkpoints):
                atomic_write(self.metrics, lambda p: p.write_text(kept))

    def check_data(self, stage: str, prints: list[dict[str, str]], resuming: bool) -> None:
        """A stage resumed mid-way must read the data it began with (or the resumed run is
        no longer the uninterrupted one): compare each dataset's `mixture.fingerprint`
        with the one recorded in RUN_DIR/fingerprints.json when the stage began."""
        recorded = self._fingerprints()
        if resuming and stage in recorded:
            for index, (then, now) in enumerate(zip(recorded[stage], prints, strict=False)):
                changed = [name for name in {**then, **now} if then.get(name) != now.get(name)]
                if changed:
                    raise UserError(
                        f"--resume: {changed[0]} (dataset {index} of stage {stage!r}) changed since "
                        f"the run began ({len(changed)} file(s) differ); a resumed run must read the "
                        "same data: restore it, or start again with --overwrite")
            return
        recorded[stage] = prints
        text = json.dumps(recorded)
        with writing(self.fingerprints, self.checkpoints):
            atomic_write(self.fingerprints, lambda p: p.write_text(text))

    def _fingerprints(self) -> dict:
        if not self.fingerprints.is_file():
            return {}
        try:
            recorded = json.loads(self.fingerprints.read_text())
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict):
            raise UserError(f"{self.fingerprints}: damaged; remove it to resume without checking the data")
        return recorded

    def log(self, row: dict) -> None:
        """A row of metrics.jsonl (rank 0 logs), and its numbers as TensorBoard scalars."""
        with writing(self.metrics, self.checkpoints), open(self.metrics, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        with writing(self.tensorboard.folder, self.checkpoints):
            self.tensorboard.write(row)

    def global_step(self, stage_index: int, step: int) -> int:
        return sum(s.steps for s in self.recipe.stages[:stage_index]) + step


def train(recipe: RecipeConfig, run_dir: str | Path, model=None,
          resume: bool = False, overwrite: bool = False) -> dict:
    """Train every stage of `recipe` into `run_dir` (continuing its newest checkpoint if
    `resume`); returns the summary.

    A run directory that already holds a trained model or checkpoints is refused unless
    `resume` (continue it) or `overwrite` (replace it). While training, the run directory
    is locked: a second `train` into it fails naming the holder (only rank 0 writes, so
    only rank 0 locks)."""
    if not recipe.stages:
        raise UserError(f"recipe {recipe.name!r} has no stages to train")
    world = distributed.setup()
    run_dir = Path(run_dir)
    if not world.is_main:
        return _train(recipe, run_dir, model, resume, overwrite, world)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the run directory {run_dir}: {error.strerror}") from None
    with exclusive(run_dir / LOCK, f"run directory {run_dir}"):
        try:
            summary = _train(recipe, run_dir, model, resume, overwrite, world)
        except BaseException:
            # a replaced run whose successor failed before its first checkpoint comes back
            if replaced.restore(run_dir):
                print(f"the new run failed before its first checkpoint; the run it was replacing "
                      f"is back in {run_dir}", file=sys.stderr)
            raise
        replaced.discard(run_dir)
        return summary


def _train(recipe: RecipeConfig, run_dir: Path, model, resume: bool, overwrite: bool,
           world: World) -> dict:
    if world.is_main and replaced.restore(run_dir):
        print(f"put back the run in {run_dir} that an interrupted --overwrite had set aside",
              file=sys.stderr)
    refuse_to_replace(run_dir, resume, overwrite)
    if world.is_main:
        remove_stale_temps(run_dir)
    started = time.perf_counter()
    resolve_epochs(recipe)
    run = Run(recipe, run_dir, resume, world)
    if model is None:
        fit_encoder_sizes(recipe)  # series encoders' channels/length at 0: from the data
        torch.manual_seed(recipe.stages[0].seed)  # parts built from scratch start the same every run
        model = build_model(recipe)
    model.to(world.device)
    objectives = StageObjectives(model, recipe, world.device)
    if run.resume_from is not None:  # a checkpoint holds the weights of the module its stage trains
        checkpoint.load_weights(run.resume_from, objectives.get(run.position[0]).module)
    try:
        for index, stage in enumerate(recipe.stages):
            start = run.position[1] if index == run.position[0] else 0
            if index < run.position[0] or start >= stage.steps:
                continue
            _train_one_stage(run, objectives.get(index), index, start)
    finally:
        run.tensorboard.close()
    world.barrier()
    if not world.is_main:
        return run.summary
    save_model(model.to("cpu"), run.dir / "model", run.checkpoints)
    # Wall time of the whole command (data checks, checkpoints, saving), over resumed sessions too.
    run.summary["wall_seconds"] = run.summary.get("wall_seconds", 0.0) + time.perf_counter() - started
    with writing(run.dir / "loss.png", run.checkpoints):
        plot_losses(run.metrics, run.dir / "loss.png")
    with writing(run.dir / "summary.json", run.checkpoints):
        atomic_write(run.dir / "summary.json", lambda p: p.write_text(json.dumps(run.summary, indent=2)))
    return run.summary


def resolve_epochs(recipe: RecipeConfig) -> None:
    """A stage given in epochs gets its step count from the number of samples it reads
    (one epoch draws as many samples as its datasets hold, mixed by weight)."""
    for stage in recipe.stages:
        if stage.epochs is not None:
            samples = sum(len(read_dataset(d)) for d in stage.data)
            per_step = stage.batch_size * stage.grad_accum
            stage.steps = max(1, math.ceil(stage.epochs * samples / per_step))


class StageObjectives:
    """Each stage's objective (`objectives.objective_for`), built as the stage begins: the
    module it trains is the model itself, or one built around a part of it (a contrastive
    stage of a multimodal LM: a DualEncoder around its encoder, dropped after the stage; the
    encoder keeps what it learned). Only the current stage's is kept."""

    def __init__(self, model, recipe: RecipeConfig, device):
        self.model, self.recipe, self.device, self.built = model, recipe, device, {}

    def get(self, index: int) -> Objective:
        if index not in self.built:
            objective = objective_for(self.recipe.stages[index], self.model)
            objective.module.to(self.device)
            self.built = {index: objective}
        return self.built[index]


def _train_one_stage(run: Run, objective: Objective, index: int, start: int) -> None:
    stage, model = objective.stage, objective.module
    bad_file = run.bad_samples if run.world.is_main else None
    with writing(run.bad_samples, run.checkpoints):  # (or a replay file, named by the error)
        datasets = [encode_dataset(objective, d, bad_file, run.dir / f"replay-{stage.name}-{i}.jsonl",
                                   fingerprinted=run.world.is_main)
                    for i, d in enumerate(stage.data)]
    if run.world.is_main:
        run.check_data(stage.name, [d.fingerprint for d in datasets], resuming=start > 0)
    mixture = Mixture(datasets, objective)
    if len(mixture) == 0:
        raise UserError(f"stage {stage.name!r}: no usable samples")
    resuming = start > 0
    totals = run.summary["stages"].get(stage.name) if resuming else None

    def log(row: dict) -> None:
        run.log({**row, "global_step": run.global_step(index, row["step"])})

    def on_checkpoint(step, optimizer_state, scheduler, stage_totals) -> None:
        _record(run, stage.name, stage_totals, sum(d.skipped_too_long for d in datasets))
        meta = {"stage_index": index, "step": step, "global_step": run.global_step(index, step),
                "summary": {k: v for k, v in run.summary.items() if k != "wall_seconds"}}
        trained_so_far = [part for earlier in run.recipe.stages[: index + 1] for part in earlier.train]
        checkpoint.save(run.checkpoints, checkpoint.trained_tensors(model, trained_so_far), optimizer_state,
                        scheduler, meta, run.recipe.checkpoint.keep)
        replaced.discard(run.dir)  # the new run has a checkpoint of its own now

    validate = Validator(objective) if stage.validation and run.world.is_main else None
    with objective.stage_context():
        train_stage(objective, mixture, log, totals=totals, start_step=start,
                    resume_from=run.resume_from if resuming else None,
                    on_checkpoint=on_checkpoint, checkpoint_every=run.recipe.checkpoint.every, world=run.world,
                    strategy=run.recipe.parallel, validate=validate)


def _record(run: Run, name: str, totals: dict, skipped: int) -> None:
    """Fold a stage's totals into the run summary (train_seconds: training steps only)."""
    stages = run.summary["stages"]
    stages[name] = {**totals, "train_seconds": totals["seconds"], "skipped_too_long": skipped}
    run.summary["train_seconds"] = sum(s["train_seconds"] for s in stages.values())
    run.summary["samples"] = sum(s["samples"] for s in stages.values())
    run.summary["tokens"] = sum(s["tokens"] for s in stages.values())
    run.summary["final_loss"] = totals["final_loss"]
