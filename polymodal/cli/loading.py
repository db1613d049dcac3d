"""Loading a model for a command, with a word to the user: what is loading, how long it
took, and when its answers cannot mean anything (random `tiny:` parts, an untrained recipe)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

QUANTIZE_CHOICES = ("int8", "int4")


def add_model_out_arguments(parser, model_help: str) -> None:
    """The positional MODEL and OUT, `--overwrite` and `--set` of a command that reads one
    model and writes a directory (`export`, `quantize`)."""
    parser.add_argument("model", help=model_help)
    parser.add_argument("out", help="the directory to write (refused if it holds files, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (a recipe MODEL only)")


def add_quantize_option(parser) -> None:
    """`--quantize int8|int4`: the LLM's decoder quantized after loading (polymodal.quantization)."""
    parser.add_argument("--quantize", metavar="BITS",
                        help="run the LLM's weights as int8 (per channel) or int4 (groups of 32)")


def quantization_settings(bits: str, group_size: int = 32, option: str = "--quantize"):
    """The QuantizationConfig for a command line's bits and group size.

    Raises:
        UserError: bits other than int8/int4, or a group size the kernels refuse.
    """
    from polymodal.config import QuantizationConfig
    from polymodal.errors import ConfigError, UserError

    if bits not in QUANTIZE_CHOICES:
        raise UserError(f"{option}: {bits!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    try:
        return QuantizationConfig(bits=bits, group_size=group_size)
    except ConfigError as error:
        raise UserError(f"--group-size: {str(error).split(': ', 1)[-1]}") from None


def load_for_command(source: str, overrides: list[str] = (), quantize: str | None = None):
    """`build.load_any(source, overrides)`, saying on stderr what loads and how long it took
    (a real LLM is slow to load on a CPU), and whether the model is untrained or random;
    with `quantize` ("int8", "int4"), the LLM's decoder quantized (polymodal.quantization).

    Raises:
        UserError: as `load_any` does, for a source that cannot be loaded; a bad `quantize`.
    """
    settings = quantization_settings(quantize) if quantize is not None else None
    from polymodal.build import load_any
    from polymodal.saved import is_model_directory

    print(f"loading {source} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = load_any(source, overrides)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    note = trained_from_tiny_note(source) if is_model_directory(source) else untrained_note(source, overrides)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if settings is not None:
        from polymodal.quantization import quantize_model

        start = time.perf_counter()
        quantize_model(model, settings)
        print(f"quantized to {settings.bits} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
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
