"""`smolvlm`: a `vit` + `pixel_shuffle` + Llama-family model in the Idefics3 layout (SmolVLM's),
and the same key table read the other way for import.

SmolVLM-256M is exactly this composition: a SigLIP tower, Idefics3's pixel shuffle with one
bias-free projection, SmolLM2-135M (Marafioti et al. 2025, "SmolVLM"; Laurençon et al. 2024,
"Building and better understanding vision-language models"). The stock classes are
transformers' `Idefics3ForConditionalGeneration` and `Idefics3Processor`
(models/idefics3/modeling_idefics3.py and processing_idefics3.py); both load with
`trust_remote_code` off through `AutoModelForImageTextToText` and `AutoProcessor`.

How the parts line up (each checked in tests/interop/test_idefics3.py):
- `vit`: its linear patch embedding is the Conv2d's weight flattened in (C, kh, kw) order, as
  `patchify` orders a patch; `nn.TransformerEncoderLayer`'s `in_proj` is q, k, v stacked;
  `linear1/2` are `mlp.fc1/2`, `norm1/2` `layer_norm1/2`, the final norm `post_layernorm`; the
  activation and epsilon are the encoder config's, written into `vision_config`.
- Idefics3's positions are bucketed fractional coordinates (NaViT); for a full square image
  whose grid side divides evenly they are 0..N-1 (checked before writing).
- `pixel_shuffle`: `space_to_depth` stacks each r x r block in (row, column, channel) order,
  as `Idefics3Connector.pixel_shuffle` does; one linear layer without bias (`bias: false`).
- The processor writes each image as `<fake_token_around_image><global-img>` K x `<image>`
  `<fake_token_around_image>`; the connector's `markers` give those two embeddings, written
  as the tokens' rows of the input embeddings. The output embeddings are written untied, so
  the logits stay polymodal's over the whole vocabulary.
- Pixels: one bicubic resize to the square side (`do_image_splitting: false`,
  `do_resize: false`, `max_image_size` = the side, `resample: 3`), then x / 255, (x - 0.5) / 0.5,
  as `processing.images.to_pixels` and `vit`'s `PixelNormalize` do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from polymodal.errors import UserError
from polymodal.interop.common import (
    DTYPES,
    ImportedParts,
    cast_floats,
    check_inline_image_model,
    check_llama_family,
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
from polymodal.interop.llava import generation_config

# The tokens Idefics3's processor writes around an image, and its end of turn.
IMAGE_TOKEN = "<image>"
AROUND_IMAGE = "<fake_token_around_image>"
GLOBAL_IMAGE = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

_ENCODER, _VISION = "encoders.image.", "model.vision_model."
_OUR_LAYER, _STOCK_LAYER = _ENCODER + "blocks.layers.{i}.", _VISION + "encoder.layers.{i}."
MARKERS = "connectors.image.markers"  # [2, D]: AROUND_IMAGE's and GLOBAL_IMAGE's embeddings
EMBED_TOKENS = "model.text_model.embed_tokens.weight"


def _same(tensor):
    return tensor


def _to_conv(weight: torch.Tensor) -> torch.Tensor:
    """[D, 3*p*p] (patchify's (C, ph, pw) order) -> Conv2d's [D, 3, p, p]."""
    patch = math.isqrt(weight.shape[1] // 3)
    return weight.reshape(weight.shape[0], 3, patch, patch)


def _from_conv(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def _split_qkv(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(weight.chunk(3, dim=0))


def _stack_qkv(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class Rename:
    """One row of the key table: polymodal's name(s) <-> Idefics3's.

    A name holding `{i}` stands for every layer; a name ending in "." is a prefix (the LLM's
    keys are the same under both). `to_stock` turns our tensor into the stock one(s),
    `from_stock` the stock tensor(s) into ours.
    """

    ours: str
    stock: str | tuple[str, ...]
    to_stock: Callable = _same
    from_stock: Callable = _same


def _layer_renames() -> list[Rename]:
    rows = [Rename(_OUR_LAYER + f"self_attn.in_proj_{kind}",
                   tuple(_STOCK_LAYER + f"self_attn.{part}_proj.{kind}" for part in "qkv"),
                   _split_qkv, _stack_qkv)
            for kind in ("weight", "bias")]
    pairs = (("self_attn.out_proj", "self_attn.out_proj"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
             ("norm1", "layer_norm1"), ("norm2", "layer_norm2"))
    rows += [Rename(_OUR_LAYER + f"{ours}.{kind}", _STOCK_LAYER + f"{stock}.{kind}")
             for ours, stock in pairs for kind in ("weight", "bias")]
    return rows


KEY_TABLE: tuple[Rename, ...] = (
    Rename(_ENCODER + "patch_embed.weight", _VISION + "embeddings.patch_embedding.weight", _to_conv, _from_conv),
    Rename(_ENCODER + "patch_embed.bias", _VISION + "embeddings.patch_embedding.bias"),
    Rename(_ENCODER + "position", _VISION + "embeddings.position_embedding.weight",
           lambda position: position[0], lambda weight: weight[None]),  # [1, N, D] <-> [N, D]
    *_layer_renames(),
    Rename(_ENCODER + "norm.weight", _VISION + "post_layernorm.weight"),
    Rename(_ENCODER + "norm.bias", _VISION + "post_layernorm.bias"),
    Rename("connectors.image.mlp.0.weight", "model.connector.modality_projection.proj.weight"),
    Rename("llm.model.model.", "model.text_model."),
    Rename("llm.model.lm_head.weight", "lm_head.weight"),
)


def _layer_index(pattern: str, name: str) -> str | None:
    """The `{i}` of `pattern` that makes `name`, or None when it does not match."""
    head, _, tail = pattern.partition("{i}")
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
        return None
    index = name[len(head):len(name) - len(tail)]
    return index if index.isdigit() else None


def _match(pattern: str, name: str) -> tuple[bool, str]:
    """(matches, what `{i}` or the prefix's rest stands for)."""
    if "{i}" in pattern:
        index = _layer_index(pattern, name)
        return index is not None, index or ""
    if pattern.endswith("."):
        return name.startswith(pattern), name[len(pattern):]
    return name == pattern, ""


def _fill(pattern: str, part: str) -> str:
    return pattern.format(i=part) if "{i}" in pattern else pattern + part if pattern.endswith(".") else pattern


def to_stock_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """polymodal's state dict (LoRA merged, markers left out) -> Idefics3's on-disk keys.

    Raises:
        KeyError: a tensor no row of `KEY_TABLE` names (a part the export checks refuse).
    """
    stock = {}
    for name, tensor in state.items():
        for row in KEY_TABLE:
            matched, part = _match(row.ours, name)
            if matched:
                break
        else:
            raise KeyError(f"no Idefics3 name for {name}")
        value = row.to_stock(tensor)
        names = row.stock if isinstance(row.stock, tuple) else (row.stock,)
        values = value if isinstance(row.stock, tuple) else (value,)
        stock.update({_fill(target, part): piece for target, piece in zip(names, values)})
    return stock


def _stock_row(name: str) -> tuple[Rename, str]:
    """The row of `KEY_TABLE` one of whose stock names is `name`, and its `{i}` or rest."""
    for row in KEY_TABLE:
        for pattern in row.stock if isinstance(row.stock, tuple) else (row.stock,):
            matched, part = _match(pattern, name)
            if matched:
                return row, part
    raise KeyError(f"no polymodal name for {name}")


def from_stock_names(stock: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Idefics3's keys -> polymodal's (the image modality's encoder and connector, the LLM);
    the inverse of `to_stock_names`. Markers are read from the embeddings by
    `markers_from_embeddings`.

    Raises:
        KeyError: a stock tensor no row names, or one of a q/k/v triple missing.
    """
    ours, used = {}, set()
    for name in stock:
        if name in used:
            continue
        row, part = _stock_row(name)
        names = [_fill(target, part) for target in (row.stock if isinstance(row.stock, tuple) else (row.stock,))]
        absent = [source for source in names if source not in stock]
        if absent:
            raise KeyError(f"{absent[0]} is missing beside {name}")
        used.update(names)
        ours[_fill(row.ours, part)] = row.from_stock(*(stock[source] for source in names))
    return ours


def idefics3_positions_in_order(grid_side: int) -> bool:
    """Whether Idefics3's bucketed positions of a full `grid_side` x `grid_side` image are
    0..side-1 per axis, as `vit`'s learned positions are read (the computation of
    `Idefics3VisionEmbeddings.forward`, in float32 as there)."""
    boundaries = torch.arange(1 / grid_side, 1.0, 1 / grid_side)
    step = 1.0 / torch.tensor([grid_side])
    coordinates = torch.clamp(torch.arange(grid_side, dtype=torch.float32) * step, max=1.0 - 1e-6)
    buckets = torch.bucketize(coordinates, boundaries, right=True)
    return torch.equal(buckets, torch.arange(grid_side))


# ---------------------------------------------------------------- export

TAKES = "vit + pixel_shuffle (depth 1, bias: false, markers: true) + llama-family LLM"
# transformers' activation names for `vit`'s
_STOCK_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def check_smolvlm_exportable(model) -> None:
    """Refuse, in one line naming the part, what Idefics3's classes cannot hold."""
    check_inline_image_model(model, "smolvlm")
    encoder, connector = model.config.encoders["image"], model.config.connectors["image"]
    if encoder.kind != "vit":
        raise refuse("model.encoders.image", f"kind {encoder.kind!r} is not Idefics3's vision tower; "
                     "smolvlm takes a vit", ["llava", "gguf"] if encoder.kind == "hf" else ())
    if connector.kind != "pixel_shuffle":
        raise refuse("model.connectors.image", f"kind {connector.kind!r} is not Idefics3's connector; "
                     "smolvlm takes pixel_shuffle", ["llava", "gguf"] if connector.kind in ("linear", "mlp") else ())
    projection = model.connector.mlp
    if connector.depth != 1:
        raise refuse("model.connectors.image.depth", f"{connector.depth} linear layers; Idefics3 projects with one")
    if projection[0].bias is not None and bool(projection[0].bias.detach().any()):
        raise refuse("model.connectors.image.bias", "Idefics3's projection has no bias (train with bias: false)")
    if model.connector.markers is None:
        raise refuse("model.connectors.image.markers", "Idefics3's processor writes <fake_token_around_image>"
                     "<global-img> ... <fake_token_around_image> around each image, which this model never "
                     "read (train with markers: true)")
    side = model.encoder.image_size // model.encoder.patch_size
    if not idefics3_positions_in_order(side):
        raise refuse("model.encoders.image.image_size", f"a {side}x{side} patch grid, whose positions "
                     "Idefics3's fractional buckets reorder")
    check_llama_family(model, "smolvlm")


def _token_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token)
            for token in (IMAGE_TOKEN, AROUND_IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE)}


def _with_marker_rows(stock: dict, markers: torch.Tensor, ids: dict[str, int], vocabulary: int) -> int:
    """Write the connector's markers as the marker tokens' rows of the input embeddings, the
    output embeddings left as they are (a copy: they may be tied to the input ones). When a
    new token's id is past the last row, both grow to a multiple of 64 (new output rows zero).
    Returns the number of rows."""
    embeddings = stock[EMBED_TOKENS].clone()
    head = stock["lm_head.weight"].clone()
    rows = max(embeddings.shape[0], vocabulary)
    if rows > embeddings.shape[0]:
        rows = -(-rows // 64) * 64
        embeddings = torch.cat([embeddings, embeddings.new_zeros(rows - embeddings.shape[0], embeddings.shape[1])])
        head = torch.cat([head, head.new_zeros(rows - head.shape[0], head.shape[1])])
    embeddings[ids[AROUND_IMAGE]] = markers[0].to(embeddings.dtype)
    embeddings[ids[GLOBAL_IMAGE]] = markers[1].to(embeddings.dtype)
    stock[EMBED_TOKENS], stock["lm_head.weight"] = embeddings, head
    return rows


def idefics3_config(model, ids: dict[str, int], rows: int, dtype: str) -> dict:
    """config.json of `Idefics3ForConditionalGeneration` for this model (sizes from its parts)."""
    encoder, connector = model.config.encoders["image"], model.config.connectors["image"]
    text = model.llm.model.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "quantization_config"):
        text.pop(key, None)
    text.update(vocab_size=rows, tie_word_embeddings=False, dtype=dtype)
    pad = model.llm.tokenizer.pad_token_id
    vision = {"model_type": "idefics3_vision", "hidden_size": encoder.width,
              "intermediate_size": int(encoder.width * encoder.mlp_ratio),
              "num_hidden_layers": encoder.depth, "num_attention_heads": encoder.heads, "num_channels": 3,
              "image_size": encoder.image_size, "patch_size": encoder.patch_size,
              "hidden_act": _STOCK_ACTIVATIONS[encoder.activation], "layer_norm_eps": encoder.layer_norm_eps}
    return {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
            "image_token_id": ids[IMAGE_TOKEN], "scale_factor": connector.factor, "pad_token_id": pad,
            "tie_word_embeddings": False, "use_cache": True, "dtype": dtype,
            "vision_config": vision, "text_config": text}


def processor_records(model) -> tuple[dict, dict]:
    """(preprocessor_config.json, processor_config.json): one bicubic resize to the square
    side, no splitting, x / 255, mean and std 0.5 (`vit`'s), K image tokens per image."""
    side = model.encoder.image_size
    image = {"image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
             "do_convert_rgb": True, "do_resize": False, "size": {"longest_edge": side},
             "do_image_splitting": False, "max_image_size": {"longest_edge": side}, "resample": 3,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True}
    processor = {"processor_class": "Idefics3Processor", "image_seq_len": model.tokens_per_image - 3}
    return image, processor


USAGE = """\
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("OUT", backend="pil")
model = AutoModelForImageTextToText.from_pretrained("OUT")
messages = [{"role": "user", "content": "<image>\\nWhat shape is in the image?"}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[Image.open("image.png")], return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(processor.decode(answer[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@register_export_format("smolvlm", takes=TAKES)
def export_smolvlm(model, directory: Path, dtype: str = "float32", facts=None) -> None:
    """Write `model` as an Idefics3 (SmolVLM) checkpoint into the empty `directory`: weights
    (LoRA merged, safetensors, the on-disk keys of `KEY_TABLE`), config.json,
    generation_config.json, the tokenizer with the image and marker tokens, the image
    processor and processor configs, the chat template and a model card (`facts`:
    common.CardFacts, the recipe and evaluation figures).

    Raises:
        UserError: a part Idefics3 cannot hold (`check_smolvlm_exportable`), before anything is written.
    """
    check_smolvlm_exportable(model)
    state = merged_state_dict(model)
    markers = state.pop(MARKERS)
    stock = to_stock_names(state)
    tokenizer = write_tokenizer(model, directory, {IMAGE_TOKEN: "image_token", AROUND_IMAGE: "fake_image_token",
                                                   GLOBAL_IMAGE: "global_image_token",
                                                   END_OF_UTTERANCE: "end_of_utterance_token"})
    ids = _token_ids(tokenizer)
    rows = _with_marker_rows(stock, markers, ids, len(tokenizer))
    write_safetensors(cast_floats(stock, dtype), directory / "model.safetensors")
    write_json(directory / "config.json", idefics3_config(model, ids, rows, dtype))
    # polymodal's engine never emits a placeholder or a padding row: the marker tokens sit
    # in polymodal's padding rows, and rows grown for them are padding too
    generation = generation_config(model)
    grown = range(model.llm.model.get_input_embeddings().weight.shape[0], rows)
    generation["suppress_tokens"] = sorted({*generation.get("suppress_tokens", ()), *grown})
    write_json(directory / "generation_config.json", generation)
    image, processor = processor_records(model)
    write_json(directory / "preprocessor_config.json", image)
    write_json(directory / "processor_config.json", processor)
    write_model_card(directory, model_card(model, "smolvlm", facts=facts, tags=["idefics3", "smolvlm"],
                                           usage=USAGE))


# ---------------------------------------------------------------- import

_OUR_ACTIVATIONS = {stock: ours for ours, stock in _STOCK_ACTIVATIONS.items()}


def vit_config_from_stock(vision: dict, where: str) -> dict:
    """Idefics3's `vision_config` -> a `vit` encoder config (as a recipe writes it).

    Raises:
        UserError: an activation `vit` lacks, or an intermediate size no `mlp_ratio` gives.
    """
    width = vision.get("hidden_size", 1152)
    activation = vision.get("hidden_act", "gelu_pytorch_tanh")
    if activation not in _OUR_ACTIVATIONS:
        raise UserError(f"{where}: vision_config.hidden_act {activation!r}; vit has "
                        f"{', '.join(_OUR_ACTIVATIONS)}")
    intermediate = vision.get("intermediate_size", 3072)
    if int(width * (intermediate / width)) != intermediate:  # vit sizes its MLP as int(width * mlp_ratio)
        raise UserError(f"{where}: vision_config.intermediate_size {intermediate} is no whole multiple "
                        f"vit can express of hidden_size {width}")
    return {"kind": "vit", "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 32),
            "width": width, "depth": vision.get("num_hidden_layers", 12), "heads": vision.get("num_attention_heads", 16),
            "mlp_ratio": intermediate / width, "activation": _OUR_ACTIVATIONS[activation],
            "layer_norm_eps": vision.get("layer_norm_eps", 1e-6)}


def markers_from_embeddings(embeddings: torch.Tensor, tokenizer) -> torch.Tensor:
    """[2, D]: the rows of `<fake_token_around_image>` and `<global-img>` (the connector's
    `markers`). Raises UserError when the tokenizer lacks either token."""
    ids = _token_ids(tokenizer)
    missing = [token for token in (AROUND_IMAGE, GLOBAL_IMAGE)
               if ids[token] is None or ids[token] == tokenizer.unk_token_id or ids[token] >= embeddings.shape[0]]
    if missing:
        raise UserError(f"the tokenizer has no {missing[0]} token, which Idefics3's processor writes around images")
    return torch.stack([embeddings[ids[AROUND_IMAGE]], embeddings[ids[GLOBAL_IMAGE]]])


def idefics3_to_polymodal(directory: str | Path, state: dict[str, torch.Tensor] | None = None,
                          tokenizer=None) -> ImportedParts:
    """An Idefics3/SmolVLM directory (safetensors only) as polymodal's parts: a `vit` +
    `pixel_shuffle` (no bias, markers read from the embedding rows of the marker tokens) +
    the text model as the LLM part `llm`; the tokenizer is the directory's. `state` (its
    tensors under their stock keys) and `tokenizer` are read from the directory unless given.

    The image is read as one tile at the vision tower's size (what `do_image_splitting:
    false` does); a checkpoint trained on split images reads its global tile only.

    Raises:
        UserError: a config.json that is not Idefics3's, an activation `vit` lacks, no
            safetensors file, a tensor the key table does not name, or marker tokens missing
            from the tokenizer; each naming the file.
    """
    from transformers import AutoTokenizer

    from polymodal.config import ModelConfig, from_dict

    directory = Path(directory)
    path = directory / "config.json"
    record = read_json(path)
    if record.get("model_type") not in ("idefics3", "smolvlm"):
        raise UserError(f"{path}: model_type {record.get('model_type')!r} is not idefics3 or smolvlm")
    text = {key: value for key, value in (record.get("text_config") or {}).items()
            if key not in ("architectures", "_name_or_path", "quantization_config")}
    text.setdefault("model_type", "llama")
    stock = dict(state) if state is not None else _stock_weights(directory)
    if "lm_head.weight" not in stock:  # tied: the head is the input embeddings
        stock["lm_head.weight"] = stock[EMBED_TOKENS]
    text["tie_word_embeddings"] = False  # written apart: the marker rows are the connector's
    text["vocab_size"] = stock[EMBED_TOKENS].shape[0]
    try:
        ours = from_stock_names(stock)
    except KeyError as error:
        raise UserError(f"{directory}: {error.args[0]} (not an Idefics3 vision tower, connector or "
                        "text model)") from None
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(directory)
    ours[MARKERS] = markers_from_embeddings(stock[EMBED_TOKENS], tokenizer)
    dtype = text.get("dtype") or record.get("dtype") or "float32"
    config = from_dict(ModelConfig, {
        "encoders": {"image": vit_config_from_stock(record.get("vision_config") or {}, str(path))},
        "connectors": {"image": {"kind": "pixel_shuffle", "factor": record.get("scale_factor", 2), "depth": 1,
                                 "bias": False, "markers": True}},
        "llm": {"source": str(directory), "dtype": dtype if dtype in DTYPES else "float32",
                "image_token": IMAGE_TOKEN}}, "model")
    return ImportedParts(config, {"llm": {"config": text}}, ours, directory)


def _stock_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every safetensors file's tensors under their stock names."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no .safetensors weights (polymodal reads only safetensors)")
    return {name: tensor for path in files for name, tensor in load_file(str(path)).items()}
