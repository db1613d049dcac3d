"""The files of a run directory (listed in train/run.py): refusing to replace a run without
the user's word, clearing what killed writers left, a full disk as one line, the final model
swapped in whole, and the recipe as saved and as compared on --resume."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path

import yaml
from safetensors import SafetensorError

from polymodal.config import RecipeConfig, from_dict, to_dict
from polymodal.errors import UserError
from polymodal.train import checkpoint


def refuse_to_replace(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run into a directory with a trained model or checkpoints would delete them:
    that takes the user's word (`--overwrite`), or `--resume` continues them instead."""
    if resume or overwrite:
        return
    held = [name for name, present in (("a model", (run_dir / "model").exists()),
                                       ("checkpoints", any((run_dir / "checkpoints").glob("step-*"))))
            if present]
    if held:
        raise UserError(f"{run_dir} already holds a run ({' and '.join(held)}); continue it with "
                        "--resume, replace it with --overwrite, or choose another --out")


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files and folders a writer killed mid-write left (`kill -9`, a power cut): with
    the run directory locked, no live writer owns any. A model folder moved aside just
    before its replacement arrived is the last complete model: it is put back."""
    model, stale = run_dir / "model", []
    for old in sorted(run_dir.glob(".model.old-*")):
        if model.exists():
            stale.append(old)
        else:
            os.replace(old, model)
    stale += [*run_dir.glob(".*.tmp-*"), *(run_dir / "checkpoints").glob(".tmp-*"), *model.glob(".*.tmp-*")]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temp file(s) an interrupted run left in {run_dir}", file=sys.stderr)


def resume_point(run_dir: Path) -> str | None:
    """The newest complete checkpoint of a run, in words, or None (for a stopped run's line)."""
    found = checkpoint.latest(Path(run_dir) / "checkpoints")
    if found is None:
        return None
    try:
        meta = checkpoint.read_meta(found)
        return f"{found.name} (stage {meta['stage_index'] + 1}, step {meta['step']})"
    except (OSError, ValueError, KeyError, TypeError):
        return found.name


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing(path: Path, checkpoints: Path):
    """A full disk (or quota) while writing `path` becomes one line naming it and the newest
    checkpoint to resume from; what was written before stays (every write that matters is
    atomic, so the file keeps its last complete version or is absent)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        full = (error.errno in FULL_DISK if isinstance(error, OSError)
                else any(mark in str(error) for mark in ("No space left", "StorageFull", "quota")))
        if not full:
            raise
        kept = checkpoint.complete(checkpoints)
        where = (error.filename if isinstance(error, OSError) else None) or path
        raise UserError(f"disk full writing {where}; " + (
            f"the last checkpoint is {kept[-1]}: free space and rerun with --resume" if kept
            else "no checkpoint written yet: free space and run again")) from None


def save_model(model, final: Path, checkpoints: Path) -> None:
    """The final model into a temp folder beside `final`, then renamed into place: a save that
    fails (a full disk) leaves the previous model folder, or none, never a half-written one."""
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        with writing(final, checkpoints):
            shutil.rmtree(temp, ignore_errors=True)
            model.save_pretrained(temp)
            if final.exists():
                os.replace(final, old)
            os.replace(temp, final)
    finally:
        if old.exists() and not final.exists():  # the new one never arrived: the old one stays
            os.replace(old, final)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def comparable_recipe(text: str) -> dict | None:
    """A saved recipe.yaml as plain data with every default filled in, so that files written
    by older versions (fields added since missing; a stage's resolved `steps` beside its
    `epochs`) compare equal to the same recipe now; None if it no longer parses."""
    try:
        data = yaml.safe_load(text)
        for stage in data.get("stages") or []:
            if isinstance(stage, dict) and stage.get("epochs") is not None:
                stage["steps"] = None
        return to_dict(from_dict(RecipeConfig, data))
    except (yaml.YAMLError, UserError, AttributeError, TypeError):
        return None


def recipe_text(recipe: RecipeConfig) -> str:
    """The recipe as YAML, as the user gave it: a stage in epochs keeps `epochs` and no
    `steps` (the count `resolve_epochs` put there), so the file loads again as a recipe."""
    data = to_dict(recipe)
    for stage in data["stages"]:
        if stage["epochs"] is not None:
            stage["steps"] = None
    return yaml.safe_dump(data, sort_keys=False)
