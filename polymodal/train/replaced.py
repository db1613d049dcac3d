"""Replacing a run (`train --overwrite`) without losing it to a mistake.

The old run's files are set aside in `RUN_DIR/.replaced/`, not deleted, and stay there
until the new run has something of its own to keep (its first checkpoint, or its end). If
the new run fails before that (a missing data file, an unknown task, Ctrl-C, a crash), the
old files are put back, as they were; a run killed before that (`kill -9`) gets them back
at the next start in the directory (`restore_if_left`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ASIDE = ".replaced"
# A run's own files: what a fresh run replaces.
RUN_FILES = ("metrics.jsonl", "bad_samples.jsonl", "loss.png", "summary.json", "fingerprints.json",
             "recipe.yaml", "checkpoints", "model", "tensorboard")


def _run_files(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in RUN_FILES if (run_dir / name).exists()] + \
        sorted(run_dir.glob("replay-*.jsonl"))


def set_aside(run_dir: Path) -> None:
    """Move the run's files into `RUN_DIR/.replaced/` (renames: nothing is copied)."""
    aside = run_dir / ASIDE
    shutil.rmtree(aside, ignore_errors=True)
    files = _run_files(run_dir)
    if not files:
        return
    aside.mkdir()
    for path in files:
        os.replace(path, aside / path.name)


def discard(run_dir: Path) -> None:
    """The new run has something to keep: the old one's files go."""
    shutil.rmtree(run_dir / ASIDE, ignore_errors=True)


def restore(run_dir: Path) -> bool:
    """Put the set-aside files back in place of the new run's; True if there were any."""
    aside = run_dir / ASIDE
    if not aside.is_dir():
        return False
    for path in _run_files(run_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in aside.iterdir():
        os.replace(path, run_dir / path.name)
    aside.rmdir()
    return True
