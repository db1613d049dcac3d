"""The saved-model directory format, and nothing else: what a model directory holds, how it
is read and checked, and the one place where older formats are brought up to date.

A model directory (any model kind: `MultimodalLM`, `DualEncoder`, ...) holds:

    config.json        {"format": "polymodal", "format_version": FORMAT_VERSION,
                        "model": the ModelConfig as plain data (its `kind` picks the class),
                        "architectures": {part ("llm", "encoders.image", ...):
                                          {"config": its transformers config, ...}}}
    model.safetensors  every weight, tied duplicates dropped (safetensors' save_model)
    tokenizer files    the LLM's (a dual encoder: its text tower's, under text/)

Every file is written atomically (safe_files.atomic_write); reading checks the record before
anything is built (safe_files.build_checked), so a damaged directory is one line naming the
file. The format is the nanochat checkpoint_manager's idea: config.json + safetensors, with
all backward-compatibility fixes in `upgrade_record`.

Example:
    write_model_files(directory, model, model.config, loader.architectures)
    record, config = read_model_config(directory)  # upgraded, then parsed
    load_saved_weights(rebuilt_model, directory)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from polymodal.config import ModelConfig, from_dict, to_dict
from polymodal.errors import UserError
from polymodal.safe_files import atomic_write, read_safetensors_header

FORMAT = "polymodal"
FORMAT_VERSION = 2  # 2: parts keyed by modality (see upgrade_record)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_model_files(directory: Path, module: nn.Module, config: ModelConfig, architectures: dict) -> None:
    """config.json (the model config and each part's architecture) and model.safetensors,
    each written atomically; the caller adds its tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(config),
              "architectures": architectures}
    atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(record, indent=2)))
    # save_model drops tied duplicates (e.g. lm_head sharing the embeddings).
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_model(module, str(path)))


def read_model_record(directory: Path) -> dict:
    """config.json of a saved model as written (not upgraded), checked for the fields loading
    reads. Raises UserError naming the file for a missing or damaged config.json, a folder
    that is not a polymodal model, or a missing model.safetensors."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"not a polymodal model directory (no config.json): {directory}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{directory}: config.json is not a polymodal model")
    architectures = record.get("architectures")
    if not isinstance(record.get("model"), dict) or not isinstance(architectures, dict) or not all(
            isinstance(part, dict) and isinstance(part.get("config"), dict) for part in architectures.values()):
        raise UserError(f"{path}: damaged (its 'model' and 'architectures' must be objects)")
    if type(record.get("format_version", 1)) is not int:
        raise UserError(f"{path}: format_version must be a whole number")
    if not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory}: model.safetensors is missing")
    return record


def upgrade_record(record: dict) -> dict:
    """A record of any earlier format version as the current code reads it.

    Every backward-compatibility fix for older saved models lives here, one step per version.
    A field renamed in ModelConfig, or a part moved, is fixed here, so that old directories
    keep loading. Raises UserError for a record saved by a newer polymodal.

    Version 1 -> 2 (parts keyed by modality): a multimodal LM's image parts were `encoder`
    and `connector`; their architectures are `encoders.image` now (the config's old keys
    still parse as the image's; the weights' names are renamed as they load, by
    model._rename_old_weights, which checkpoints of version 1 need as well).
    """
    version = record.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise UserError(f"model was saved by a newer polymodal (format {version})")
    if version < 2 and record["model"].get("kind", "multimodal-lm") == "multimodal-lm":
        renamed = {("encoders.image" + key[len("encoder"):] if key.split(".")[0] == "encoder" else key): value
                   for key, value in record["architectures"].items()}
        record = {**record, "format_version": 2, "architectures": renamed}
    return record


def read_model_config(directory: Path) -> tuple[dict, ModelConfig]:
    """(the upgraded record, its model config parsed): what every model kind's
    from_pretrained starts from. Raises UserError (ConfigError for a bad field, named
    `model.FIELD`) as read_model_record and the config parser do."""
    record = upgrade_record(read_model_record(directory))
    return record, from_dict(ModelConfig, record["model"], "model")


def saved_model_kind(directory: Path) -> str:
    """The model kind (`multimodal-lm`, `dual-encoder`, ...) a saved directory holds."""
    kind = upgrade_record(read_model_record(directory))["model"].get("kind", "multimodal-lm")
    if not isinstance(kind, str):
        raise UserError(f"{directory / CONFIG_FILE}: model.kind must be a string")
    return kind


def is_model_directory(path: str | os.PathLike) -> bool:
    """Whether `path` holds a polymodal config.json (the directory may still be damaged)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        record = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


def load_saved_weights(module: nn.Module, directory: Path) -> None:
    """model.safetensors into a rebuilt model. Raises UserError naming the file for a
    mismatch or a damaged file (the header is checked first: see polymodal.safe_files)."""
    from safetensors import SafetensorError

    path = directory / WEIGHTS_FILE
    read_safetensors_header(path)  # a damaged file is named here, before safetensors reads it
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        problem = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{path}: cannot load the weights ({problem})") from None
    if missing or unexpected:
        raise UserError(f"{directory}: weights do not match the config "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")


def load_saved_tokenizer(directory: Path):
    """The tokenizer saved in `directory`. Raises UserError naming the folder if its files
    are damaged."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # transformers raises many kinds for a damaged tokenizer file
        problem = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{directory}: cannot load the tokenizer files ({problem})") from None
