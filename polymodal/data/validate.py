"""Check every sample before training: files exist and decode, placeholders match images.

Bad samples are skipped and listed with their reason in `bad_samples.jsonl`; too many
bad samples stop the run before it starts (LLaVA's "tokenization mismatch" warnings
silently dropped them instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from polymodal.data.formats import Sample
from polymodal.errors import UserError
from polymodal.processing.audio import AUDIO_SUFFIXES, read_wav
from polymodal.processing.images import open_image


def sample_problem(sample: Sample, placeholder: str, verdicts: dict[str, str | None]) -> str | None:
    """Why this sample cannot be used, or None. `verdicts` holds each media path's, checked once."""
    found = sum(message["content"].count(placeholder) for message in sample.messages)
    if found != len(sample.images):
        return f"{len(sample.images)} image(s) but {found} {placeholder} placeholder(s)"
    if not any(message["role"] == "assistant" for message in sample.messages):
        return "no assistant turn to learn from"
    for path in sample.images:
        if path not in verdicts:
            verdicts[path] = media_problem(path)
        if verdicts[path]:
            return verdicts[path]
    return None


# (path, size, modification time) -> why the file does not decode, or None. The stages of a
# recipe read the same images (easy-VQA's 4,000 three times): each decodes once per process,
# again only if the file changes.
_MEDIA_VERDICTS: dict[tuple[str, int, int], str | None] = {}


def media_problem(path: str) -> str | None:
    """Why the image or audio file at `path` cannot be used, or None."""
    try:
        status = os.stat(path)
    except OSError:
        status = None  # open_image / read_wav name the problem
    key = (path, status.st_size, status.st_mtime_ns) if status else None
    if key in _MEDIA_VERDICTS:
        return _MEDIA_VERDICTS[key]
    try:
        if Path(path).suffix.lower() in AUDIO_SUFFIXES:
            read_wav(path)
        else:
            open_image(path)
        verdict = None
    except UserError as error:
        verdict = str(error)
    if key is not None:
        _MEDIA_VERDICTS[key] = verdict
    return verdict


def check_samples(samples: list[Sample], placeholder: str, bad_file: Path | None,
                  max_bad_fraction: float = 0.01, name: str = "data") -> list[Sample]:
    """The usable samples; the rest go to `bad_file`. Raises when too many are bad."""
    good, bad, verdicts = [], [], {}
    for sample in tqdm(samples, desc=f"checking {name}", unit="sample", leave=False):
        problem = sample_problem(sample, placeholder, verdicts)
        if problem is None:
            good.append(sample)
        else:
            bad.append({"id": sample.id, "reason": problem})
    if bad and bad_file is not None:
        bad_file.parent.mkdir(parents=True, exist_ok=True)
        with open(bad_file, "a") as handle:
            handle.writelines(json.dumps({"dataset": name, **row}) + "\n" for row in bad)
    if samples and len(bad) / len(samples) > max_bad_fraction:
        raise UserError(f"{name}: {len(bad)} of {len(samples)} samples are bad (more than "
                        f"{max_bad_fraction:.0%}); first: {bad[0]['id']}: {bad[0]['reason']}"
                        + (f"; all listed in {bad_file}" if bad_file else ""))
    return good
