"""The one build/load dispatch: a model config, a recipe, a saved directory or an LLM source
in, the model of its kind out.

A model kind (`model.kind` in a recipe: `multimodal-lm`, `dual-encoder`, or one a package
registers) is a class in `registry.MODEL_KINDS` with two constructors:

    from_config(config: ModelConfig) -> model      parts built or loaded from their sources
    from_pretrained(directory) -> model            a saved directory (polymodal.saved)

Nothing else in polymodal chooses a class by kind; training, the commands, evaluation,
search and serving all come here.

Example:
    model = build_model(load_recipe("recipes/tiny-llava.yaml"))
    model.save_pretrained("out/model")
    again = load_any("out/model")  # the same kind, the same weights
"""

from __future__ import annotations

import os
from pathlib import Path

from polymodal.config import LLMConfig, ModelConfig, RecipeConfig, load_recipe
from polymodal.errors import UserError
from polymodal.registry import MODEL_KINDS
from polymodal.saved import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_model_directory,
    saved_model_kind,
)


def model_class(kind: str) -> type:
    """The class registered as model kind `kind`; UserError listing the known kinds otherwise."""
    return MODEL_KINDS.get(kind).builder


def build_model(config: ModelConfig | RecipeConfig):
    """The configured model: new parts initialised, pretrained ones loaded from their
    sources; for a recipe with `init_from`, the trained model saved there instead.

    Raises:
        UserError: an unknown kind, a source that cannot be loaded, a damaged init_from.
    """
    if isinstance(config, RecipeConfig):
        if config.init_from:  # the trained model the recipe's stages start from
            from polymodal.interop.imports import load_stock, stock_format

            if stock_format(config.init_from):  # a llava-hf or SmolVLM directory, with the recipe's LoRA
                return load_stock(config.init_from, config.model)
            return load_model(config.init_from)
        config = config.model
    return model_class(config.kind).from_config(config)


def load_model(directory: str | os.PathLike):
    """A saved model directory, rebuilt as the kind its config.json names; a llava-hf or
    SmolVLM/Idefics3 directory, imported (polymodal.interop.imports).

    Raises:
        UserError: naming the file, for a missing or damaged file or an unknown kind.
    """
    from polymodal.interop.imports import load_stock, stock_format

    directory = Path(directory)
    if stock_format(directory):
        return load_stock(directory)
    kind = saved_model_kind(directory)
    if kind not in MODEL_KINDS:
        raise UserError(f"{directory / CONFIG_FILE}: model.kind {kind!r} is not a known model kind; "
                        f"known: {', '.join(MODEL_KINDS.names())}")
    return model_class(kind).from_pretrained(directory)


def load_any(source: str, overrides: list[str] = ()):
    """What a command's MODEL argument names: a saved model directory (loaded as saved), a
    recipe YAML (built as configured, `--set` overrides applied) or an LLM source (a text-only
    MultimodalLM: `tiny:llama`, `pkg:...`, `gguf:...`, a transformers folder or hub name).

    Raises:
        UserError: overrides for anything but a recipe, or what loading or building raises.
    """
    from polymodal.interop.imports import stock_format

    # A polymodal config.json, a llava-hf or SmolVLM one, or any config.json beside
    # model.safetensors (a damaged one: load_model's first read names what is wrong), is a saved model.
    if Path(source, CONFIG_FILE).is_file() and (Path(source, WEIGHTS_FILE).is_file() or is_model_directory(source)
                                                or stock_format(source)):
        if overrides:
            raise UserError("--set applies to recipes only; a saved model is used as it was trained")
        return load_model(source)
    if source.endswith((".yaml", ".yml")):
        return build_model(load_recipe(source, overrides))
    if overrides:
        raise UserError("--set applies to recipes only")
    return build_model(ModelConfig(llm=LLMConfig(source=source)))
