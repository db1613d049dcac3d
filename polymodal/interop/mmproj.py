"""The mmproj GGUF: an image encoder and connector as llama.cpp's `clip` model (tools/mtmd).

Two projector types, the ones whose compositions polymodal has (ggml-org/llama.cpp
tools/mtmd/clip-impl.h names every key and tensor written here):

- `mlp` (LLaVA-1.5): an `hf` CLIP or SigLIP encoder + an `mlp` connector of depth 2. llama.cpp's
  llava graph runs the first `clip.vision.feature_layer` blocks (the hidden state polymodal's
  encoder reads, counted from 0 = the embeddings; the layers after it are not written, as
  llama.cpp's legacy converter drops them), applies no post-layernorm (not written), drops the
  CLS token, then `mm.2(gelu(mm.0(x)))`.
- `idefics3` (SmolVLM): a `vit` + `pixel_shuffle` in the Idefics3 layout (interop/idefics3.py
  names it): every block, the post-layernorm, pixel shuffle by `clip.vision.projector.scale_factor`,
  then `mm.model.fc` (no bias).

The block activation is `clip.use_gelu` (true: GELU, as ggml computes it, tanh-approximated;
false: CLIP's quick_gelu). Matrices are written in the chosen type, embeddings, norms and biases
in F32 (as convert_hf_to_gguf.py's SmolVLM model forces for `.embeddings.`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from polymodal.interop.ggml_types import FILE_TYPES, add_tensors

# Vision tower tensor (transformers' CLIP, SigLIP and Idefics3 vision names, relative to
# `vision_model.`) -> mmproj tensor; `{i}` a block.
VISION_TENSORS = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
    "encoder.layers.{i}.self_attn.q_proj.weight": "v.blk.{i}.attn_q.weight",
    "encoder.layers.{i}.self_attn.q_proj.bias": "v.blk.{i}.attn_q.bias",
    "encoder.layers.{i}.self_attn.k_proj.weight": "v.blk.{i}.attn_k.weight",
    "encoder.layers.{i}.self_attn.k_proj.bias": "v.blk.{i}.attn_k.bias",
    "encoder.layers.{i}.self_attn.v_proj.weight": "v.blk.{i}.attn_v.weight",
    "encoder.layers.{i}.self_attn.v_proj.bias": "v.blk.{i}.attn_v.bias",
    "encoder.layers.{i}.self_attn.out_proj.weight": "v.blk.{i}.attn_out.weight",
    "encoder.layers.{i}.self_attn.out_proj.bias": "v.blk.{i}.attn_out.bias",
    "encoder.layers.{i}.layer_norm1.weight": "v.blk.{i}.ln1.weight",
    "encoder.layers.{i}.layer_norm1.bias": "v.blk.{i}.ln1.bias",
    "encoder.layers.{i}.layer_norm2.weight": "v.blk.{i}.ln2.weight",
    "encoder.layers.{i}.layer_norm2.bias": "v.blk.{i}.ln2.bias",
    "encoder.layers.{i}.mlp.fc1.weight": "v.blk.{i}.ffn_up.weight",
    "encoder.layers.{i}.mlp.fc1.bias": "v.blk.{i}.ffn_up.bias",
    "encoder.layers.{i}.mlp.fc2.weight": "v.blk.{i}.ffn_down.weight",
    "encoder.layers.{i}.mlp.fc2.bias": "v.blk.{i}.ffn_down.bias",
    "post_layernorm.weight": "v.post_ln.weight",
    "post_layernorm.bias": "v.post_ln.bias",
}
# Projector tensors, by projector type: polymodal / Idefics3 name -> mmproj name.
PROJECTOR_TENSORS = {
    "mlp": {"connectors.image.mlp.0.weight": "mm.0.weight", "connectors.image.mlp.0.bias": "mm.0.bias",
            "connectors.image.mlp.2.weight": "mm.2.weight", "connectors.image.mlp.2.bias": "mm.2.bias"},
    "idefics3": {"model.connector.modality_projection.proj.weight": "mm.model.fc.weight"},
}
_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.")
# transformers' hidden_act -> clip.use_gelu (ggml's GELU is the tanh approximation)
USE_GELU = {"gelu": True, "gelu_pytorch_tanh": True, "gelu_new": True, "quick_gelu": False}


def vision_tensors(state: dict[str, torch.Tensor], prefix: str, blocks: int, post_norm: bool) -> dict[str, torch.Tensor]:
    """mmproj name -> tensor for the vision tower under `prefix` (`encoders.image.model.`,
    `model.vision_model.`): the embeddings, the first `blocks` blocks, the post-layernorm when
    `post_norm`; what else the tower holds (SigLIP's pooling head, later blocks) is left out."""
    out = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        relative = name[len(prefix):]
        match = _BLOCK.match(relative)
        if match and int(match.group(1)) >= blocks:
            continue
        if relative.startswith("post_layernorm.") and not post_norm:
            continue
        template = _BLOCK.sub("encoder.layers.{i}.", relative, count=1)
        target = VISION_TENSORS.get(template)
        if target is None:
            continue  # SigLIP's `head.*` (attention pooling): not used by LLaVA or llama.cpp
        out[target.replace("{i}", match.group(1)) if match else target] = tensor
    return out


def projector_tensors(state: dict[str, torch.Tensor], projector: str) -> dict[str, torch.Tensor]:
    return {target: state[name] for name, target in PROJECTOR_TENSORS[projector].items()}


def feature_layer(layer: int, depth: int) -> int:
    """polymodal's `hf` encoder `layer` (a hidden-state index, negative from the end) as
    llama.cpp's non-negative `clip.vision.feature_layer` (0 = the embeddings, k = after block k)."""
    return layer if layer >= 0 else depth + 1 + layer


def write_mmproj(path: Path, tensors: dict[str, torch.Tensor], metadata: dict, matrix_type: str,
                 name: str = "polymodal") -> None:
    """Write an mmproj GGUF (`general.architecture = clip`).

    Args:
        tensors: mmproj name -> tensor (see VISION_TENSORS, PROJECTOR_TENSORS).
        metadata: the `clip.*` facts: projector_type, image_size, patch_size, embedding_length,
            feed_forward_length, block_count, head_count, layer_norm_epsilon, projection_dim,
            image_mean, image_std, use_gelu, and optionally feature_layer, scale_factor.
        matrix_type: F32, F16 or BF16 for the 2-D weights other than the embeddings.
    """
    import gguf

    keys = gguf.Keys.ClipVision
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    file_type = next(file for file, kind in FILE_TYPES.values() if kind == matrix_type)
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, metadata["projector_type"])
    writer.add_bool(keys.USE_GELU, metadata["use_gelu"])
    for key, field in ((keys.IMAGE_SIZE, "image_size"), (keys.PATCH_SIZE, "patch_size"),
                       (keys.EMBEDDING_LENGTH, "embedding_length"), (keys.FEED_FORWARD_LENGTH, "feed_forward_length"),
                       (keys.BLOCK_COUNT, "block_count"), (keys.Attention.HEAD_COUNT, "head_count"),
                       (keys.PROJECTION_DIM, "projection_dim")):
        writer.add_uint32(key, int(metadata[field]))
    writer.add_float32(keys.Attention.LAYERNORM_EPS, float(metadata["layer_norm_epsilon"]))
    writer.add_array(keys.IMAGE_MEAN, [float(value) for value in metadata["image_mean"]])
    writer.add_array(keys.IMAGE_STD, [float(value) for value in metadata["image_std"]])
    if "feature_layer" in metadata:
        writer.add_array("clip.vision.feature_layer", [int(metadata["feature_layer"])])
    if "scale_factor" in metadata:
        writer.add_uint32(keys.Projector.SCALE_FACTOR, int(metadata["scale_factor"]))
        writer.add_uint32(keys.PREPROC_IMAGE_SIZE, int(metadata["image_size"]))
    typed = {}
    for tensor_name, tensor in tensors.items():
        array = tensor.detach().to(torch.float32).cpu().numpy()
        embedding = tensor_name.startswith(("v.patch_embd", "v.position_embd", "v.class_embd"))
        typed[tensor_name] = (array, "F32" if array.ndim < 2 or embedding else matrix_type)
    add_tensors(writer, typed)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
