"""Check every sample before training: files exist and decode, placeholders match images.

Bad samples are skipped and listed with their reason (and their place in the data file,
`where`) in `bad_samples.jsonl`; too many bad samples stop the run before it starts with a
DataError naming the first (LLaVA's "tokenization mismatch" warnings silently dropped them
instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from polymodal.data.errors import DataError
from polymodal.data.sample import Sample
from polymodal.errors import UserError
from polymodal.processing.audio import AUDIO_SUFFIXES, read_wav
from polymodal.processing.images import open_image
from polymodal.processing.series import SERIES_SUFFIXES, read_series


def sample_problem(sample: Sample, placeholder: str, verdicts: dict[str, str | None]) -> str | None:
    """Why this sample cannot be used, or None. `verdicts` holds each media path's, checked once."""
    if sample.problem:
        return sample.problem
    found = sum(message["content"].count(placeholder) for message in sample.messages)
    has_user = any(message["role"] == "user" for message in sample.messages)
    if found != len(sample.images) and (found or not has_user):  # none: put before the first user turn
        return f"{len(sample.images)} image(s) but {found} {placeholder} placeholder(s)"
    if not any(message["role"] == "assistant" for message in sample.messages):
        return "no assistant turn to learn from"
    if any(message["role"] == "assistant" and placeholder in message["content"]
           for message in sample.messages):
        # its image's features would be trained as part of the answer
        return f"{placeholder} inside an assistant turn (images go in user turns)"
    for path in sample.media_paths():
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
    """Why the image, audio or series file at `path` cannot be used, or None."""
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
        elif Path(path).suffix.lower() in SERIES_SUFFIXES:
            read_series(path)
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
            bad.append({"id": sample.id, "reason": problem, **({"where": sample.where} if sample.where else {})})
    record_bad(bad_file, name, bad)
    stop_if_too_many(bad, len(samples), max_bad_fraction, name, bad_file, "bad")
    return good


def record_bad(bad_file: Path | None, name: str, rows: list[dict]) -> None:
    """Append `rows` ({id, reason, where?}) of dataset `name` to `bad_file`, each (dataset, id,
    reason) once: the stages of a recipe and every --resume check the same data again."""
    if not rows or bad_file is None:
        return
    listed = set()
    if bad_file.is_file():
        for line in bad_file.read_text().splitlines():
            try:
                row = json.loads(line)
                listed.add((row["dataset"], row["id"], row["reason"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: listed again below if it is still bad
    new = [row for row in rows if (name, row["id"], row["reason"]) not in listed]
    new = list({(row["id"], row["reason"]): row for row in new}.values())  # repeats within `rows`
    if new:
        bad_file.parent.mkdir(parents=True, exist_ok=True)
        with open(bad_file, "a") as handle:
            handle.writelines(json.dumps({"dataset": name, **row}) + "\n" for row in new)


def stop_if_too_many(skipped: list[dict], total: int, max_bad_fraction: float, name: str,
                     bad_file: Path | None, what: str = "bad", others: int = 0) -> None:
    """Raise a DataError when more than `max_bad_fraction` of `total` samples were skipped
    (`skipped`, plus `others` counted before; `what`: how the message calls them), naming the
    first of `skipped` (by its place in the file when known, else its id) and where all are listed."""
    count = len(skipped) + others
    if total and skipped and count / total > max_bad_fraction:
        first = skipped[0].get("where") or skipped[0]["id"]
        raise DataError(f"{count} of {total} samples are {what} (more than {max_bad_fraction:.0%}); "
                        f"first: {first}: {skipped[0]['reason']}"
                        + (f"; all listed in {bad_file}" if bad_file else ""), name)
