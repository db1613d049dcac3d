"""`--format llava`: transformers' `LlavaForConditionalGeneration`, in llava-hf's on-disk layout.

Takes an `hf` CLIP or SigLIP encoder (the hidden layer it reads, CLS kept or dropped), a
`linear` or `mlp` (depth 1 or 2, no LayerNorm) connector, inline fusion, and a Llama-family
LLM. LLaVA (Liu et al., 2023, "Visual Instruction Tuning"; transformers' `models/llava`)
reads `vision_tower(pixels).hidden_states[vision_feature_layer]` (no post-layernorm), drops
the first token when `vision_feature_select_strategy` is "default" (CLS) and keeps all when
"full", projects with `linear_2(act(linear_1(x)))`, and puts the result where `<image>` ids
stand: exactly what polymodal's `hf` encoder, `mlp` connector and inline fusion compute.

Written files: model.safetensors (written here, in the layout published llava-hf checkpoints
use, which transformers maps onto its in-memory names on load), config.json,
generation_config.json, the tokenizer with `<image>`, chat_template.jinja (renders image
parts), preprocessor_config.json, processor_config.json and README.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from polymodal.errors import UserError
from polymodal.interop.common import (
    LLAMA_FAMILY,
    ImportedParts,
    cast_floats,
    check_inline_image_model,
    check_llama_family,
    media_chat_template,
    merged_state_dict,
    model_card,
    read_json,
    refuse,
    register_export_format,
    write_json,
    write_model_card,
    write_safetensors,
    write_tokenizer,
)

# polymodal key prefix <-> llava-hf on-disk key prefix, one table for both directions.
# (transformers 5 loads these as model.language_model.*, lm_head.*, model.vision_tower.* without
# `vision_model.`, model.multi_modal_projector.*: conversion_mapping.py's "llava" and
# "CLIPVisionModel" entries.)
LLAVA_KEYS = (
    ("llm.model.model.", "language_model.model."),
    ("llm.model.lm_head.", "language_model.lm_head."),
    ("encoders.image.model.", "vision_tower.vision_model."),
    ("connectors.image.mlp.0.", "multi_modal_projector.linear_1."),
    ("connectors.image.mlp.2.", "multi_modal_projector.linear_2."),
)
# A `linear` connector's one layer is linear_1 (export only: its linear_2 is the identity,
# written so, with projector_hidden_act "linear"; importing folds linear_2 back in).
LINEAR_CONNECTOR_KEY = ("connectors.image.proj.", "multi_modal_projector.linear_1.")
VISION_FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TAKES = "hf CLIP/SigLIP encoder + linear/mlp connector + llama-family LLM"


def to_llava_key(name: str) -> str | None:
    """polymodal weight name -> its llava-hf on-disk name (None: no place in LLaVA)."""
    for ours, theirs in (*LLAVA_KEYS, LINEAR_CONNECTOR_KEY):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return None


def to_polymodal_key(name: str) -> str | None:
    """llava-hf on-disk name (or transformers 5's in-memory one) -> polymodal's (None: none).
    The projector maps as an `mlp` connector's layers."""
    name = _on_disk_name(name)
    for ours, theirs in LLAVA_KEYS:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


def _on_disk_name(name: str) -> str:
    """transformers 5's in-memory LLaVA names (model.language_model.*, model.vision_tower.*,
    lm_head.*) as the on-disk layout spells them."""
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model.vision_tower.") and not name.startswith("model.vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("model.vision_tower."):]
    return name.removeprefix("model.")


# ---------------------------------------------------------------- what the model maps to


def llava_plan(model: nn.Module) -> dict:
    """The LLaVA config fields this model maps to, after checking every part has a stock
    equivalent. Raises UserError (one line naming the part) for one that has none."""
    check_inline_image_model(model, "llava")
    check_llama_family(model, "llava", LLAMA_FAMILY)
    encoder_config, connector_config = model.config.encoders["image"], model.config.connectors["image"]
    if encoder_config.kind != "hf":
        raise refuse("model.encoders.image", f"kind {encoder_config.kind!r}; llava takes an hf CLIP or "
                     "SigLIP encoder", ["smolvlm", "gguf"] if encoder_config.kind == "vit" else ())
    encoder = model.encoders["image"]
    vision_type = encoder.model.config.model_type
    if vision_type not in VISION_FAMILIES:
        raise refuse("model.encoders.image.source", f"a {vision_type!r} vision model; llava takes "
                     "clip_vision_model or siglip_vision_model")
    act = _projector_activation(connector_config)
    return {
        "vision_feature_layer": encoder.layer,
        # "default" drops the first token (CLIP's CLS); SigLIP has none, so keeps all: "full"
        "vision_feature_select_strategy": "default" if encoder.has_cls and not encoder.keep_cls else "full",
        "num_additional_image_tokens": int(encoder.has_cls),
        "projector_hidden_act": act,
        "image_seq_length": model.connectors["image"].num_tokens,
        "image_token_index": model.llm.image_token_id,
    }


def _projector_activation(connector) -> str:
    """LLaVA's projector is linear_2(act(linear_1(x))): GELU between two layers (mlp depth 2),
    or no activation and linear_2 the identity (linear, mlp depth 1)."""
    kind = connector.kind
    if kind == "linear":
        return "linear"
    if kind != "mlp":
        formats = ["smolvlm", "gguf"] if kind == "pixel_shuffle" else ()
        raise refuse("model.connectors.image", f"kind {kind!r} has no place in LLaVA's projector "
                     "(linear or a 2-layer GELU mlp)", formats)
    if connector.norm:
        raise refuse("model.connectors.image.norm", "a LayerNorm before the connector has no place in "
                     "LLaVA's projector (linear_1, GELU, linear_2)")
    if connector.depth > 2:
        raise refuse("model.connectors.image.depth", f"{connector.depth} layers; LLaVA's projector has "
                     "two (depth 1 or 2 export)")
    return "gelu" if connector.depth == 2 else "linear"


# ---------------------------------------------------------------- weights and config


def llava_state_dict(model: nn.Module, act: str, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The model's weights (LoRA merged) under llava-hf's on-disk names, in `dtype`; tied
    output embeddings written once (under the input embeddings' name)."""
    state = merged_state_dict(model)
    out = {}
    for name, tensor in state.items():
        key = to_llava_key(name)
        if key is None:  # every weight of an exportable model has a place; a miss is a bug here
            raise RuntimeError(f"llava export: no LLaVA name for weight {name}")
        out[key] = tensor
    if act == "linear":  # one linear layer: linear_2 is the identity, exact in any float type
        width = model.llm.hidden_size
        out["multi_modal_projector.linear_2.weight"] = torch.eye(width)
        out["multi_modal_projector.linear_2.bias"] = torch.zeros(width)
    if _tied(model):
        out.pop("language_model.lm_head.weight", None)
    return cast_floats(out, dtype)


def _tied(model: nn.Module) -> bool:
    lm = model.llm.model
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def llava_config(model: nn.Module, plan: dict, dtype: str) -> dict:
    """config.json: transformers' own LlavaConfig, built from the parts' configs."""
    from transformers import LlavaConfig

    text = model.llm.model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures"):
        text.pop(key, None)
    text.update(vocab_size=model.llm.model.get_input_embeddings().weight.shape[0],
                tie_word_embeddings=_tied(model), dtype=dtype)
    vision = model.encoders["image"].model.config.to_dict()
    for key in ("_name_or_path", "architectures"):
        vision.pop(key, None)
    vision["dtype"] = dtype
    fields = {key: plan[key] for key in ("vision_feature_layer", "vision_feature_select_strategy",
                                         "projector_hidden_act", "image_seq_length", "image_token_index")}
    config = LlavaConfig(text_config=text, vision_config=vision, multimodal_projector_bias=True,
                         tie_word_embeddings=_tied(model), **fields)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config.to_dict()


def generation_config(model: nn.Module) -> dict:
    """generation_config.json: greedy, stopping where polymodal stops (EOS and end of turn),
    and never choosing what polymodal's engine never emits (`suppress_tokens`): the media
    placeholders and the embedding rows padded past the vocabulary (engine/generate.py)."""
    tokenizer = model.llm.tokenizer
    stops = sorted(model.llm.stop_token_ids())
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    never = sorted({*model.placeholder_ids.values(), *range(len(tokenizer), rows)})
    record = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": stops[0] if len(stops) == 1 else stops, "do_sample": False,
              "suppress_tokens": never}
    return {key: value for key, value in record.items() if value is not None}


def image_processor_config(model: nn.Module, plan: dict) -> dict:
    """preprocessor_config.json: what polymodal does to an image (processing/images.py): a
    bicubic resize to the encoder's square size (no crop), /255, then the encoder's mean and std."""
    encoder = model.encoders["image"]
    size = encoder.image_size
    return {
        "image_processor_type": "LlavaImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,  # PIL BICUBIC
        "do_center_crop": False, "crop_size": {"height": size, "width": size},
        "do_pad": False,
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": encoder.normalize.mean.flatten().tolist(),
        "image_std": encoder.normalize.std.flatten().tolist(),
    }


def processor_config(model: nn.Module, plan: dict) -> dict:
    """processor_config.json: LlavaProcessor's options, so it expands `<image>` into the
    image's token count: (S/p)^2 + num_additional_image_tokens, minus one for "default"."""
    return {"processor_class": "LlavaProcessor",
            "patch_size": model.encoders["image"].model.config.patch_size,
            "vision_feature_select_strategy": plan["vision_feature_select_strategy"],
            "num_additional_image_tokens": plan["num_additional_image_tokens"],
            "image_token": model.llm.image_token}


USAGE = """\
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("DIRECTORY")
model = AutoModelForImageTextToText.from_pretrained("DIRECTORY")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\\nWhat shape is this?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:]
print(processor.decode(answer, skip_special_tokens=True))"""


@register_export_format("llava", takes=TAKES)
def export_llava(model: nn.Module, directory: Path, dtype: str = "float32", facts=None) -> None:
    """Write `model` as a llava-hf directory into `directory` (empty; `export_model` gives a
    temporary one and moves it into place). `facts` (common.CardFacts): the recipe and
    evaluation figures for the model card. Raises UserError, before writing anything, for a
    part LLaVA has no place for."""
    plan = llava_plan(model)
    state = llava_state_dict(model, plan["projector_hidden_act"], dtype)
    tokenizer = write_tokenizer(model, directory, {model.llm.image_token: "image_token"},
                                media_chat_template(model))
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) <= rows, f"{len(tokenizer)} tokens but {rows} embedding rows"
    write_safetensors(state, directory / "model.safetensors")
    write_json(directory / "config.json", llava_config(model, plan, dtype))
    write_json(directory / "generation_config.json", generation_config(model))
    write_json(directory / "preprocessor_config.json", image_processor_config(model, plan))
    write_json(directory / "processor_config.json", processor_config(model, plan))
    write_model_card(directory, model_card(model, "llava", facts=facts, tags=["llava", "image-text-to-text"],
                                           usage=USAGE))


# ---------------------------------------------------------------- import


def llava_to_polymodal(directory: str | Path) -> ImportedParts:
    """A llava-hf directory (safetensors only) as polymodal's parts: an `hf` encoder reading
    vision_feature_layer (keep_cls for "full" on CLIP), an `mlp` connector of depth 2 for a GELU
    projector or a `linear` one for projector_hidden_act "linear" (linear_2 folded into
    linear_1: W2 W1, W2 b1 + b2), and the text model as the LLM; the tokenizer is the
    directory's. Raises UserError naming config.json for what polymodal cannot hold (a list
    of feature layers, another activation, a projector without bias, "default" on SigLIP)."""
    directory = Path(directory)
    record = read_json(directory / "config.json")
    if record.get("model_type") != "llava":
        raise UserError(f"{directory / 'config.json'}: model_type {record.get('model_type')!r}, not llava")
    from transformers import LlavaConfig

    config = LlavaConfig.from_dict(record)
    vision, text = config.vision_config, config.text_config
    connector = _imported_connector(config, directory)
    encoder = _imported_encoder(config, directory)
    stats = _image_stats(directory, vision)
    image_token = _image_token(directory)
    state = _imported_weights(directory, connector["kind"])
    from polymodal.config import ModelConfig, from_dict

    model_config = from_dict(ModelConfig, {
        "llm": {"source": str(directory), "image_token": image_token},
        "encoders": {"image": encoder}, "connectors": {"image": connector}}, "model")
    architectures = {
        "llm": {"config": _plain(text)},
        "encoders.image": {"config": _plain(vision), "image_size": stats[0], "mean": list(stats[1]),
                           "std": list(stats[2])}}
    return ImportedParts(model_config, architectures, state, directory)


def _plain(config) -> dict:
    data = config.to_dict()
    for key in ("_name_or_path", "architectures", "quantization_config"):
        data.pop(key, None)
    return data


def _imported_connector(config, directory: Path) -> dict:
    where = directory / "config.json"
    if not config.multimodal_projector_bias:
        raise UserError(f"{where}: multimodal_projector_bias false; polymodal's projector layers have biases")
    if config.projector_hidden_act == "gelu":
        return {"kind": "mlp", "depth": 2}
    if config.projector_hidden_act == "linear":
        return {"kind": "linear"}
    raise UserError(f"{where}: projector_hidden_act {config.projector_hidden_act!r}; polymodal's mlp "
                    "connector uses gelu (or linear: none)")


def _imported_encoder(config, directory: Path) -> dict:
    where = directory / "config.json"
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise UserError(f"{where}: vision_feature_layer {layer}; polymodal's hf encoder reads one layer")
    family = VISION_FAMILIES.get(config.vision_config.model_type)
    if family is None:
        raise UserError(f"{where}: vision_config.model_type {config.vision_config.model_type!r}; "
                        f"polymodal reads {', '.join(VISION_FAMILIES)}")
    if family == "siglip" and strategy == "default":
        raise UserError(f"{where}: vision_feature_select_strategy 'default' drops SigLIP's first patch "
                        "(it has no CLS); polymodal keeps every patch")
    return {"kind": "hf", "source": str(directory), "layer": layer,
            "keep_cls": family == "clip" and strategy == "full"}


def _image_stats(directory: Path, vision) -> tuple[int, tuple, tuple]:
    """(square size, mean, std) from preprocessor_config.json (its crop when it crops)."""
    from polymodal.sources import IMAGE_STATS

    mean, std = IMAGE_STATS[VISION_FAMILIES[vision.model_type]]
    size = vision.image_size
    path = directory / "preprocessor_config.json"
    if path.is_file():
        processor = read_json(path)
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        shape = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
        if isinstance(shape, dict):
            size = shape.get("height") or shape.get("shortest_edge") or size
    return int(size), tuple(mean), tuple(std)


def _image_token(directory: Path) -> str:
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            token = read_json(path).get("image_token")
            if isinstance(token, str):
                return token
    return "<image>"


def _imported_weights(directory: Path, connector: str) -> dict[str, torch.Tensor]:
    """Every safetensors shard's tensors under polymodal's names; a linear projector folded."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no .safetensors weights (polymodal reads only safetensors)")
    state = {}
    for path in files:
        for name, tensor in load_file(str(path)).items():
            key = to_polymodal_key(name)
            if key is None:
                raise UserError(f"{path}: weight {name} has no place in polymodal's LLaVA composition")
            state[key] = tensor
    if connector == "linear":
        first_w, first_b = state.pop("connectors.image.mlp.0.weight"), state.pop("connectors.image.mlp.0.bias")
        second_w, second_b = state.pop("connectors.image.mlp.2.weight"), state.pop("connectors.image.mlp.2.bias")
        state["connectors.image.proj.weight"] = second_w.double() @ first_w.double()
        state["connectors.image.proj.bias"] = second_w.double() @ first_b.double() + second_b.double()
        for key in ("connectors.image.proj.weight", "connectors.image.proj.bias"):
            state[key] = state[key].to(first_w.dtype)
    return state
