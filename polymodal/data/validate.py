"""Check every sample before training: files exist and decode, placeholders match images.

Bad samples are skipped and listed with their reason in `bad_samples.jsonl`; too many
bad samples stop the run before it starts (LLaVA's "tokenization mismatch" warnings
silently dropped them instead).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from polymodal.data.formats import Sample
from polymodal.errors import UserError
from polymodal.processing.audio import AUDIO_SUFFIXES, read_wav
from polymodal.processing.images import open_image


def sample_problem(sample: Sample, placeholder: str, decoded: dict[str, str | None]) -> str | None:
    """Why this sample cannot be used, or None. `decoded` caches each image path's verdict."""
    found = sum(message["content"].count(placeholder) for message in sample.messages)
    if found != len(sample.images):
        return f"{len(sample.images)} image(s) but {found} {placeholder} placeholder(s)"
    if not any(message["role"] == "assistant" for message in sample.messages):
        return "no assistant turn to learn from"
    for path in sample.images:
        if path not in decoded:
            try:
                if Path(path).suffix.lower() in AUDIO_SUFFIXES:
                    read_wav(path)
                else:
                    open_image(path)
                decoded[path] = None
            except UserError as error:
                decoded[path] = str(error)
        if decoded[path]:
            return decoded[path]
    return None


def check_samples(samples: list[Sample], placeholder: str, bad_file: Path | None,
                  max_bad_fraction: float = 0.01, name: str = "data") -> list[Sample]:
    """The usable samples; the rest go to `bad_file`. Raises when too many are bad."""
    good, bad, decoded = [], [], {}
    for sample in tqdm(samples, desc=f"checking {name}", unit="sample", leave=False):
        problem = sample_problem(sample, placeholder, decoded)
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
