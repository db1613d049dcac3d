"""One stage of training: an explicit loop, no framework.

The loop sees only the stage's objective (`polymodal.objectives`): which module trains and
which of its parts, the batches, the loss and what it counts. Everything else is here: the
optimizer, schedule, accumulation, clipping, precision, logging and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm import tqdm

from polymodal.config import StageConfig
from polymodal.errors import UserError
from polymodal.objectives.base import Objective
from polymodal.train import checkpoint
from polymodal.train.compiled import compile_layers, uncompile
from polymodal.train.distributed import (
    SINGLE_PROCESS,
    World,
    full_optimizer_state,
    gather_into,
    load_full_optimizer_state,
    unwrapped,
    wrap,
)
from polymodal.train.mixture import Mixture
from polymodal.train.precision import choose_precision


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: training diverged (a learning rate too high, a bad
    batch), which is not a mistake in what the user typed. The message names the stage and
    the step; `polymodal train` prints it on one line and exits 1."""

    def __init__(self, loss: float, step: int, stage: str):
        super().__init__(f"loss is {loss} at step {step} of stage {stage!r}; stopped")
        self.loss, self.step, self.stage = loss, step, stage


def make_optimizer(objective: Objective, module: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the objective's parameter groups of `module` (one per trained part, each
    with its learning rate)."""
    groups = objective.parameter_groups(module)
    if not groups:
        stage = objective.stage
        raise UserError(f"stage {stage.name!r}: nothing to train in {stage.train}")
    # fused: one vectorised pass over all tensors (CPU and CUDA), not a loop of small ops per
    # tensor, which the easy-VQA recipe's 420 adapter tensors felt at every step
    # (docs/experiments.md).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=objective.stage.weight_decay, fused=fused)


def learning_rate_factor(stage: StageConfig) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warmup, then cosine decay to zero at the last
    step, or (`wsd`) the peak until the last `decay_ratio` of steps and a linear decay to zero."""
    warmup = max(1, round(stage.warmup_ratio * stage.steps)) if stage.warmup_ratio > 0 else 0
    decay_start = max(warmup, stage.steps - round(stage.decay_ratio * stage.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if stage.schedule == "wsd":
            return 1.0 if step < decay_start else (stage.steps - step) / max(1, stage.steps - decay_start)
        progress = (step - warmup) / max(1, stage.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_stage(objective: Objective, mixture: Mixture, log: Callable[[dict], None],
                totals: dict | None = None, start_step: int = 0, resume_from=None,
                on_checkpoint: Callable | None = None, checkpoint_every: int | None = None,
                world: World = SINGLE_PROCESS, strategy: str = "ddp",
                validate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Run optimizer steps `start_step`..`stage.steps` of the objective's stage on its
    module; returns totals (samples, the objective's count (`tokens` or `pairs`), seconds,
    final loss).

    `resume_from` is a checkpoint whose optimizer, schedule and RNG state continue here;
    `on_checkpoint(step, optimizer_state, scheduler, totals)` runs on rank 0 every
    `checkpoint_every` steps and at the stage's end. `strategy`: ddp or fsdp (with
    several processes). `validate(model)` (a `train.validation.Validator`) runs on rank 0
    every `stage.validation.every` steps and at the end; its row goes to `log`.

    Raises:
        NonFiniteLoss: the loss became NaN or inf (every process stops at the same step).
    """
    stage, model = objective.stage, objective.module
    if stage.batch_size % world.size:
        raise UserError(f"stage {stage.name!r}: batch_size {stage.batch_size} does not split over "
                        f"{world.size} processes")
    objective.set_trainable(model)
    # The model itself, DDP around it (averages the processes' gradients), or its sharded copy (FSDP).
    trainer = wrap(model, world, strategy)
    optimizer = make_optimizer(objective, unwrapped(trainer))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(stage))
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    chosen, why = choose_precision(stage.precision, world.device)
    precision = (torch.autocast(world.device.type, dtype=torch.bfloat16) if chosen == "bfloat16"
                 else nullcontext())
    if resume_from is not None:
        load_full_optimizer_state(trainer, optimizer, checkpoint.restore_optimizer(resume_from, scheduler))
    else:
        torch.manual_seed(stage.seed)
    if stage.compile and compile_layers(model) and world.is_main:
        tqdm.write(f"stage {stage.name}: decoder layers compiled (torch.compile; the first step compiles them)")
    model.train()
    trainer.train()
    totals = totals or {"samples": 0, "tokens": 0, "seconds": 0.0, "final_loss": None}
    totals.update(precision=chosen, precision_reason=why)  # summary.json says what `auto` picked
    if world.is_main and stage.precision == "auto":
        tqdm.write(f"stage {stage.name}: precision {chosen} ({why})")
    progress = tqdm(range(start_step, stage.steps), desc=f"stage {stage.name}", unit="step",
                    dynamic_ncols=True, initial=start_step, total=stage.steps, disable=not world.is_main)
    for step in progress:
        started = time.perf_counter()
        loss, count = _accumulate(objective, trainer, mixture, step, world, precision)
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss, step + 1, stage.name)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, stage.clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        totals["samples"] += stage.batch_size * stage.grad_accum
        totals[objective.unit] = totals.get(objective.unit, 0) + count
        totals["seconds"] += seconds
        totals["final_loss"] = loss
        progress.set_postfix({"loss": f"{loss:.4f}", f"{objective.unit}/s": f"{count / seconds:.0f}"})
        if world.is_main and ((step + 1) % stage.log_every == 0 or step + 1 == stage.steps):
            rates = {group["name"]: rate for group, rate in zip(optimizer.param_groups, scheduler.get_last_lr())}
            log({"stage": stage.name, "step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0],
                 "learning_rates": rates, "grad_norm": float(grad_norm),
                 f"{objective.unit}_per_second": count / seconds})
        if stage.validation and ((step + 1) % stage.validation.every == 0 or step + 1 == stage.steps):
            gather_into(model, trainer)  # every process takes part; rank 0 (`validate`) measures
            if validate is not None:
                log({"stage": stage.name, "step": step + 1, **validate(model)})
        due = checkpoint_every and (step + 1) % checkpoint_every == 0
        if on_checkpoint is not None and (due or step + 1 == stage.steps):
            gather_into(model, trainer)  # every process takes part in gathering FSDP shards
            optimizer_state = full_optimizer_state(trainer, optimizer)
            if world.is_main:
                on_checkpoint(step + 1, optimizer_state, scheduler, totals)
    gather_into(model, trainer)
    if stage.compile:
        uncompile(model)
    model.eval()
    return totals


def _accumulate(objective: Objective, trainer: torch.nn.Module, mixture: Mixture, step: int, world: World,
                precision) -> tuple[float, int]:
    """Forward and backward over the step's micro-batches; (the step's loss averaged over
    the processes, the objective's count summed over them). Every process gets the same
    loss, so all stop together on a NaN."""
    stage = objective.stage
    loss_sum, count = 0.0, 0
    for micro in range(stage.grad_accum):
        batch = mixture.batch(step, micro, world.rank, world.size).to(world.device)
        with precision:
            step_loss = objective.loss(trainer, batch)
        (step_loss.loss / stage.grad_accum).backward()
        loss_sum += step_loss.loss.item() / stage.grad_accum
        count += step_loss.count
    return world.average(loss_sum), round(world.average(count) * world.size)
