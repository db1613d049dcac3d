"""Import: a llava-hf or SmolVLM/Idefics3 directory is a model source.

`polymodal chat DIR`, `eval DIR`, `serve DIR` load it (build.load_any), and a recipe starts
from it with `init_from: DIR` (build.build_model), where the recipe's `model:` block, merged
over the imported config, adds what polymodal adds: LoRA (`model: {llm: {lora: {r: 8}}}`), a
system prompt, a context length. Only safetensors weights are read; `trust_remote_code` is
never needed (the classes are transformers' own).

The route is the saved model's (model.MultimodalLM.from_pretrained): the stock config.json
becomes a polymodal ModelConfig and each part's transformers architecture (llava.py's
`llava_to_polymodal`, idefics3.py's `idefics3_to_polymodal`: the key tables that also export),
the parts are built from those architectures without loading any source, and the renamed
weights are loaded over them; the tokenizer and generation config are the directory's.

Example:
    model = load_stock("exports/tiny-llava")              # as `polymodal chat` does
    recipe: {init_from: exports/tiny-llava, model: {llm: {lora: {r: 8}}}, stages: [...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from polymodal.config import ModelConfig, to_dict
from polymodal.errors import UserError
from polymodal.interop.common import ImportedParts
from polymodal.registry import register_stock_model

# config.json model_type -> the stock layout it is read as
STOCK_TYPES = {"llava": "llava", "idefics3": "idefics3", "smolvlm": "idefics3"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def stock_format(directory: str | os.PathLike) -> str | None:
    """"llava" or "idefics3" when `directory` holds a stock checkpoint polymodal imports
    (its config.json's model_type), else None (a polymodal model, anything else, no folder)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") == "polymodal":
        return None
    model_type = record.get("model_type")
    return STOCK_TYPES.get(model_type) if isinstance(model_type, str) else None


def check_safetensors(directory: Path) -> list[Path]:
    """The directory's .safetensors files. Raises UserError (one line naming the folder) when
    there are none: pickled weights (pytorch_model.bin) are never read, since loading them
    runs code from the file."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(path.name for path in directory.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UserError(f"{directory}: weights in pickle files only ({pickled[0]}); polymodal reads "
                        "safetensors only (in transformers: save_pretrained(..., safe_serialization=True))")
    raise UserError(f"{directory}: no .safetensors weights")


def read_stock(directory: str | os.PathLike) -> ImportedParts:
    """A stock directory as polymodal's parts (config, architectures, renamed weights).

    Raises:
        UserError: not a llava/idefics3/smolvlm directory, no safetensors weights, or what the
            format's reader refuses (naming config.json or the weight).
    """
    directory = Path(directory)
    kind = stock_format(directory)
    if kind is None:
        raise UserError(f"{directory}: not a llava-hf or SmolVLM/Idefics3 directory "
                        f"(config.json model_type: {', '.join(STOCK_TYPES)})")
    files = check_safetensors(directory)
    if kind == "llava":
        from polymodal.interop.llava import llava_to_polymodal

        return llava_to_polymodal(directory)
    from safetensors.torch import load_file

    from polymodal.interop.idefics3 import idefics3_to_polymodal
    from polymodal.saved import load_saved_tokenizer

    state = {name: tensor for path in files for name, tensor in load_file(str(path)).items()}
    return idefics3_to_polymodal(directory, state, load_saved_tokenizer(directory))


@register_stock_model("llava")
@register_stock_model("idefics3")
@register_stock_model("smolvlm")
def stock_model_config(directory: str | os.PathLike) -> dict:
    """A stock directory's polymodal ModelConfig as plain data: what `init_from: DIR` gives a
    recipe's `model` (config.load_recipe looks this up by model_type)."""
    return to_dict(read_stock(directory).config)


def load_stock(directory: str | os.PathLike, config: ModelConfig | None = None):
    """A stock directory as a MultimodalLM, ready to chat, evaluate, serve or train.

    Args:
        config: the model config to build (a recipe's: the imported one with the recipe's
            changes, such as LoRA); default the imported one. LoRA adapters start fresh
            (peft's initialisation: B = 0, so the model computes what the checkpoint does).

    Raises:
        UserError: as `read_stock`, or weights that do not fit the config (naming the folder).
    """
    from polymodal.model import MultimodalLM
    from polymodal.saved import load_saved_tokenizer
    from polymodal.sources import PartLoader

    directory = Path(directory)
    parts = read_stock(directory)
    config = config or parts.config
    tokenizer = load_saved_tokenizer(parts.tokenizer_directory)
    model = MultimodalLM(config, PartLoader(architectures=parts.architectures), tokenizer)
    state = _under_lora_names(model, parts.state_dict)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        first = str(error).strip().splitlines()[-1].strip()[:200]
        raise UserError(f"{directory}: the weights do not fit the model config ({first})") from None
    missing = [name for name in missing if "lora_" not in name and not _tied_to_loaded(model, name, state)]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{directory}: the weights do not fit the model config ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {example})")
    _use_generation_config(model, directory)
    return model.eval()


def _tied_to_loaded(model, name: str, state: dict) -> bool:
    """Whether parameter `name` is the same tensor as one loaded under another name (an
    output head tied to the input embeddings, written once)."""
    names = {}
    for other, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(other)
    for shared in names.values():
        if name in shared:
            return any(other in state for other in shared if other != name)
    return False


def _under_lora_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's `...q_proj.weight` as `...q_proj.base_layer.weight` where peft put an
    adapter (the model's LoRA config), so the base weights load under the adapters."""
    from peft.tuners.lora import LoraLayer

    adapted = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not adapted:
        return state
    renamed = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        renamed[f"{module}.base_layer.{leaf}" if module in adapted else name] = tensor
    return renamed


def _use_generation_config(model, directory: Path) -> None:
    """The directory's generation_config.json (its end-of-turn ids, which polymodal's engine
    stops at), when it has one."""
    if not (directory / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.llm.model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise UserError(f"{directory / 'generation_config.json'}: cannot be read ({error})") from None

