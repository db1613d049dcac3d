"""Checkpoints a resumed run continues from exactly: weights, optimizer, schedule, RNG, position.

Layout: RUN_DIR/checkpoints/step-000120/{weights.safetensors, optimizer.safetensors, meta.json}.
The weights are those some stage so far has trained (`trained_tensors`), not the whole
model: a resumed run rebuilds the rest as the first run did, pretrained parts from their
sources and untrained new parts from the recipe's seed. For the easy-VQA recipe that is
~80 MB of connector and adapters per checkpoint instead of the 620 MB with the frozen LLM.
A checkpoint is written into a `.tmp-*` folder, every file fsynced, and renamed into
place in one step, so a save killed half-way leaves only a `.tmp-*` folder that
`latest()` never picks. No pickle: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polymodal.errors import UserError
from polymodal.objectives.base import part_parameters
from polymodal.safe_files import fsync_file

FILES = ("weights.safetensors", "optimizer.safetensors", "meta.json")


def trained_tensors(model, parts: list[str]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: the parameters of `parts` (those stages so far
    have trained; parts `model` lacks, like a contrastive stage's projection once the stage
    is over, are skipped) and every persistent buffer (small; frozen modules may update them)."""
    modules = model.part_modules()
    trained = set()
    for part in parts:
        # An earlier stage's part may not exist here (`encoder.image` trained by an lm
        # stage, then a contrastive stage's model): skip it, by its exact name.
        has_part = modules.get("llm") is not None if part == "llm.lora" else modules.get(part) is not None
        if has_part:
            trained.update(id(p) for p in part_parameters(model, part))
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if id(p) in trained}
    persistent = model.state_dict().keys()
    tensors.update({name: b.contiguous() for name, b in model.named_buffers() if name in persistent})
    return tensors


def save(folder: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler, meta: dict,
         keep: int) -> Path:
    """Write a checkpoint named by meta["global_step"]; keep only the newest `keep`.
    `weights` from `trained_tensors`; `optimizer_state` is `optimizer.state_dict()` (or its
    FSDP-gathered equivalent)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{meta['global_step']:07d}"
    temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        save_file(weights, str(temp / "weights.safetensors"))
        tensors, layout = _flatten_optimizer(optimizer_state)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from its own generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(temp / "optimizer.safetensors"))
        record = {**meta, "optimizer_layout": layout, "scheduler": scheduler.state_dict()}
        (temp / "meta.json").write_text(json.dumps(record))
        for name in FILES:
            fsync_file(temp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except (OSError, SafetensorError) as error:  # a full disk, most often: say so, keep the last one
        kept = complete(folder)
        raise UserError(f"could not write checkpoint {final.name} ({error}); "
                        + (f"{kept[-1].name} is the newest complete one: free space and rerun with --resume"
                           if kept else "no complete checkpoint yet")) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    for old in sorted(complete(folder))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints (never `.tmp-*` leftovers), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if all((p / name).is_file() for name in FILES)]
    return sorted(found)


def latest(folder: Path) -> Path | None:
    found = complete(folder)
    return found[-1] if found else None


META_KEYS = ("stage_index", "step", "global_step", "summary", "optimizer_layout", "scheduler")


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint with all its files still cannot be resumed from (a file damaged on
    disk, cut short by a crash or a full disk outside our rename), or None. Reads it whole."""
    name = "meta.json"
    try:
        meta = read_meta(checkpoint)
        if not isinstance(meta, dict) or any(key not in meta for key in META_KEYS):
            return "meta.json: not a checkpoint's record"
        for name in ("weights.safetensors", "optimizer.safetensors"):
            load_file(str(checkpoint / name))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        return f"{name}: {first}"
    return None


def latest_usable(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that reads back whole, and a line for each newer one skipped."""
    skipped = []
    for candidate in reversed(complete(folder)):
        why = problem(candidate)
        if why is None:
            return candidate, skipped
        skipped.append(f"skipped checkpoint {candidate.name} ({why})")
    return None, skipped


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


def load_weights(checkpoint: Path, model) -> None:
    """Put a checkpoint's weights into the rebuilt model; the parts it lacks stay as built."""
    _, unexpected = model.load_state_dict(load_file(str(checkpoint / "weights.safetensors")), strict=False)
    if unexpected:
        raise UserError(f"checkpoint {checkpoint} does not fit this model: no {unexpected[0]!r} in it")


def restore_optimizer(checkpoint: Path, scheduler) -> dict:
    """Restores the scheduler and the torch RNG as they were when saved; returns the
    optimizer state (for `optimizer.load_state_dict` or its FSDP equivalent)."""
    meta = read_meta(checkpoint)
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    if "rng.cuda" in tensors:
        cuda_state = tensors.pop("rng.cuda")
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_state)
    scheduler.load_state_dict(meta["scheduler"])
    return _unflatten_optimizer(tensors, meta["optimizer_layout"])


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as named tensors plus JSON for everything else."""
    tensors, values = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.contiguous()
            else:
                values[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in layout["values"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}
