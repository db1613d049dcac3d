"""One stage of training: an explicit loop, no framework.

The model-specific part of a step is `model(batch).loss`; everything else here is
the optimizer, schedule, accumulation, clipping, precision and logging.
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
from polymodal.llm import merged_lora
from polymodal.train import checkpoint
from polymodal.train.checkpoint import part_parameters
from polymodal.train.distributed import (
    SINGLE_PROCESS,
    World,
    full_optimizer_state,
    gather_into,
    load_full_optimizer_state,
    to_device,
    wrap,
)
from polymodal.train.mixture import Mixture


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the message names the stage and step."""


def make_optimizer(model, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group (and learning rate) per trained part."""
    model.set_trainable(stage.train)
    groups, seen = [], set()
    for part in stage.train:
        # `llm` already holds the adapters when both are named; never add a tensor twice.
        params = [p for p in part_parameters(model, part) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if part == "llm.lora" and stage.lora_plus_ratio:
            groups += lora_plus_groups(model, params, stage.lr[part], stage.lora_plus_ratio)
        elif params:
            groups.append({"params": params, "lr": stage.lr[part], "name": part})
    if not groups:
        raise UserError(f"stage {stage.name!r}: nothing to train in {stage.train}")
    # fused: one vectorised pass over all tensors (CPU and CUDA), not a loop of small ops per
    # tensor, which the easy-VQA recipe's 420 adapter tensors felt at every step
    # (docs/experiments.md).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay, fused=fused)


def lora_plus_groups(model, params: list, lr: float, ratio: float) -> list[dict]:
    """LoRA+: the adapters' A matrices at `lr`, their B matrices (zero at the start) at `ratio` x `lr`."""
    b_ids = {id(p) for name, p in model.llm.named_parameters() if "lora_B" in name or "lora_embedding_B" in name}
    a_part = [p for p in params if id(p) not in b_ids]
    b_part = [p for p in params if id(p) in b_ids]
    return [group for group in ({"params": a_part, "lr": lr, "name": "llm.lora"},
                                {"params": b_part, "lr": lr * ratio, "name": "llm.lora.B"}) if group["params"]]


def adapters_folded_unless_trained(model, stage: StageConfig):
    """Context for a stage: when it trains neither the LLM nor its LoRA adapters (an align
    stage), the adapters are folded into the base weights for its duration and restored
    exactly after (`llm.merged_lora`). The LLM computes the same function without running
    the adapters' matmuls at every step (the easy-VQA align stage's time is in
    docs/experiments.md). Fresh adapters (B = 0) fold in as exact zeros, so
    nothing changes by a bit."""
    llm = getattr(model, "llm", None)
    if llm is None or {"llm", "llm.lora"} & set(stage.train):
        return nullcontext()
    return merged_lora(llm.model)


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


def train_stage(model, stage: StageConfig, mixture: Mixture, log: Callable[[dict], None],
                totals: dict | None = None, start_step: int = 0, resume_from=None,
                on_checkpoint: Callable | None = None, checkpoint_every: int | None = None,
                world: World = SINGLE_PROCESS, strategy: str = "ddp",
                validate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Run optimizer steps `start_step`..`stage.steps`; returns totals (samples, tokens, seconds, loss).

    `resume_from` is a checkpoint whose optimizer, schedule and RNG state continue here;
    `on_checkpoint(step, optimizer_state, scheduler, totals)` runs on rank 0 every
    `checkpoint_every` steps and at the stage's end. `strategy`: ddp or fsdp (with
    several processes). `validate(model)` (a `train.validation.Validator`) runs on rank 0
    every `stage.validation.every` steps and at the end; its row goes to `log`.
    """
    if stage.batch_size % world.size:
        raise UserError(f"stage {stage.name!r}: batch_size {stage.batch_size} does not split over "
                        f"{world.size} processes")
    model.set_trainable(stage.train)
    # The model itself, DDP around it (averages the processes' gradients), or its sharded copy (FSDP).
    trainer = wrap(model, world, strategy)
    optimizer = make_optimizer(getattr(trainer, "module", trainer), stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(stage))
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    precision = (torch.autocast(world.device.type, dtype=torch.bfloat16) if stage.precision == "bfloat16"
                 else nullcontext())
    if resume_from is not None:
        load_full_optimizer_state(trainer, optimizer, checkpoint.restore_optimizer(resume_from, scheduler))
    else:
        torch.manual_seed(stage.seed)
    model.train()
    trainer.train()
    rate_name, rate_key = (("tok/s", "tokens_per_second") if stage.objective == "lm"
                           else ("pairs/s", "pairs_per_second"))
    totals = totals or {"samples": 0, "tokens": 0, "seconds": 0.0, "final_loss": None}
    progress = tqdm(range(start_step, stage.steps), desc=f"stage {stage.name}", unit="step",
                    dynamic_ncols=True, initial=start_step, total=stage.steps, disable=not world.is_main)
    for step in progress:
        started = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(stage.grad_accum):
            batch = to_device(mixture.batch(model, step, micro, world.rank, world.size), world.device)
            with precision:
                output = trainer(batch)
            (output.loss / stage.grad_accum).backward()
            loss_sum += output.loss.item() / stage.grad_accum
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["num_items"]
        loss_sum = world.average(loss_sum)  # the same number on every process, so all stop together
        tokens = round(world.average(tokens) * world.size)
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"loss is {loss_sum} at step {step + 1} of stage {stage.name!r}; stopped")
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, stage.clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        totals["samples"] += stage.batch_size * stage.grad_accum
        if stage.objective == "lm":  # a contrastive stage counts (image, text) pairs, not tokens
            totals["tokens"] += tokens
        totals["seconds"] += seconds
        totals["final_loss"] = loss_sum
        progress.set_postfix({"loss": f"{loss_sum:.4f}", rate_name: f"{tokens / seconds:.0f}"})
        if world.is_main and ((step + 1) % stage.log_every == 0 or step + 1 == stage.steps):
            log({"stage": stage.name, "step": step + 1, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                 "grad_norm": float(grad_norm), rate_key: tokens / seconds})
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
    model.eval()
    return totals
