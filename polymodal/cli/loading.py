"""Loading a model for a command, with a word to the user: what is loading, how long it
took, and when its answers cannot mean anything (random `tiny:` parts, an untrained recipe)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def load_for_command(source: str, overrides: list[str] = ()):
    """`build.load_any(source, overrides)`, saying on stderr what loads and how long it took
    (a real LLM is slow to load on a CPU), and whether the model is untrained or random.

    Raises:
        UserError: as `load_any` does, for a source that cannot be loaded.
    """
    from polymodal.build import load_any
    from polymodal.saved import is_model_directory

    print(f"loading {source} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = load_any(source, overrides)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    note = trained_from_tiny_note(source) if is_model_directory(source) else untrained_note(source, overrides)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model


def trained_from_tiny_note(directory: str) -> str | None:
    """A saved model whose parts began as `tiny:` random models: trained, but from parts so
    small that its answers mean little (the starter recipe's model is one)."""
    from polymodal.saved import read_model_record

    tiny = sorted({value for value in _strings(read_model_record(Path(directory))["model"])
                   if value.startswith("tiny:")})
    if not tiny:
        return None
    return (f"this model was trained from {', '.join(tiny)}: small random models for tests, "
            f"so its answers mean little")


def untrained_note(source: str, overrides: list[str] = ()) -> str | None:
    """Why a model built from `source` (not a saved model) answers noise, or None."""
    if source.startswith("tiny:"):
        return f"{source} is a small model with random weights, for tests: its answers are noise"
    if not source.endswith((".yaml", ".yml")) or not Path(source).is_file():
        return None
    from polymodal.config import load_recipe

    recipe = load_recipe(source, overrides)
    tiny = sorted({value for value in _strings(recipe.model) if value.startswith("tiny:")})
    if tiny:
        return (f"{', '.join(tiny)}: small random models for tests; the answers of a model "
                f"built from them are noise")
    return ("a recipe builds an untrained model (its new parts are random); train it with "
            "`polymodal train` and use the model directory it writes")


def _strings(value) -> list[str]:
    """Every string inside a config dataclass (as `dataclasses.asdict`), dict or list."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []
