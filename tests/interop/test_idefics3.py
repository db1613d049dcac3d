"""`polymodal export --format smolvlm`: plain transformers (in a subprocess that never imports
polymodal) loads the Idefics3 export with no missing or unexpected keys and gives polymodal's
prompt (the marker tokens where polymodal's connector puts its markers), pixels, logits
(within 1e-4) and greedy answers; export then import gives the same logits again; the parts
that differ from Idefics3's (pixel-shuffle channel order, positions, bias, markers) are
checked one by one; refusals are one line; a failed export leaves nothing behind."""

from __future__ import annotations

import json

import export_proofs
import pytest
import torch
import yaml
from export_proofs import export_all, messages, polymodal_side

from polymodal.connectors.pixel_shuffle import space_to_depth
from polymodal.interop import idefics3 as idefics3_module
from polymodal.interop.common import merged_state_dict
from polymodal.interop.idefics3 import (
    AROUND_IMAGE,
    GLOBAL_IMAGE,
    MARKERS,
    from_stock_names,
    idefics3_positions_in_order,
    idefics3_to_polymodal,
    to_stock_names,
)

VIT = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}
SIGLIP_LIKE = {**VIT, "activation": "gelu_tanh", "layer_norm_eps": 1e-6}  # SmolVLM's tower's choices
SHUFFLE = {"kind": "pixel_shuffle", "factor": 2, "bias": False, "markers": True}
# name -> (encoder, connector, llm)
COMPOSITIONS = {
    "llama": (SIGLIP_LIKE, SHUFFLE, {}),
    "llama_lora": (VIT, SHUFFLE, {"lora": {"r": 4, "alpha": 8}}),
    "qwen2": (VIT, {**SHUFFLE, "factor": 4}, {"source": "tiny:qwen2"}),
}


def build(name: str):
    return export_proofs.build(*COMPOSITIONS[name])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, export directory, plain-transformers result, image): export_proofs.export_all."""
    return export_all(COMPOSITIONS, "smolvlm", tmp_path_factory.mktemp("idefics3"))


def as_polymodal_ids(ids: list[int], directory, image_token_id: int) -> list[int]:
    """The export's prompt ids with its marker tokens read as the image placeholder, which is
    where polymodal's connector puts the markers."""
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    markers = {token["id"] for token in tokenizer["added_tokens"] if token["content"] in (AROUND_IMAGE, GLOBAL_IMAGE)}
    assert len(markers) == 2
    return [image_token_id if token in markers else token for token in ids]


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_plain_transformers_gives_polymodals_ids_logits_and_answer(exported, name):
    model, directory, plain, image = exported[name]
    assert plain["model_class"] == "Idefics3ForConditionalGeneration"
    assert plain["processor_class"] == "Idefics3Processor"
    assert plain["loading_info"]["missing_keys"] == [] and plain["loading_info"]["unexpected_keys"] == []
    ids, logits, answer = polymodal_side(model, image)
    assert plain["input_ids"] != ids  # the processor writes marker tokens ...
    assert as_polymodal_ids(plain["input_ids"], directory, model.llm.image_token_id) == ids  # ... where ours go
    assert plain["logits"].shape == logits.shape
    assert (plain["logits"] - logits).abs().max().item() <= 1e-4
    assert plain["answer_ids"] == answer
    assert len(answer) > 0


def test_the_processor_gives_polymodals_pixels(exported):
    model, _, plain, image = exported["llama"]
    pixels = model.processor.encode(messages(str(image)))["media"]["image"]  # [1, 3, 32, 32] in [0, 1]
    assert plain["pixel_values"].shape == (1, 1, 3, 32, 32)
    assert (plain["pixel_values"][0] - model.encoder.normalize(pixels)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_export_then_import_gives_the_same_logits(exported, name):
    from transformers import AutoTokenizer

    from polymodal.model import MultimodalLM
    from polymodal.sources import PartLoader

    model, directory, _, image = exported[name]
    parts = idefics3_to_polymodal(directory)
    again = MultimodalLM(parts.config, PartLoader(architectures=parts.architectures),
                         AutoTokenizer.from_pretrained(directory)).eval()
    again.load_state_dict(parts.state_dict, strict=True)
    assert parts.config.encoders["image"].activation == model.config.encoders["image"].activation
    ids, logits, answer = polymodal_side(model, image)
    ids_again, logits_again, answer_again = polymodal_side(again, image)
    assert ids_again == ids and answer_again == answer
    assert (logits_again - logits).abs().max().item() <= 1e-5


def test_space_to_depth_is_idefics3s_pixel_shuffle():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    features = torch.randn(2, 8 * 8, 5)  # [B, S, D]: an 8x8 grid
    for factor in (2, 4):
        theirs = Idefics3Connector.pixel_shuffle(None, features, scale_factor=factor)
        assert torch.equal(space_to_depth(features, 8, factor), theirs)
    assert not torch.equal(space_to_depth(features, 8, 2), features.reshape(2, 16, 20))  # the order matters


def test_idefics3_positions_are_vits_on_most_grids():
    assert idefics3_positions_in_order(8) and idefics3_positions_in_order(32)
    assert not idefics3_positions_in_order(19)  # fractional buckets reorder some sides


def test_key_table_runs_both_ways():
    model = build("llama_lora")
    state = merged_state_dict(model)
    markers = state.pop(MARKERS)
    stock = to_stock_names(state)
    assert stock["model.vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)
    assert "model.vision_model.encoder.layers.1.self_attn.k_proj.bias" in stock
    assert "model.connector.modality_projection.proj.weight" in stock and "lm_head.weight" in stock
    back = from_stock_names(stock)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[name], state[name]) for name in state)
    assert markers.shape == (2, model.llm.hidden_size)


def test_connector_options():
    model = build("llama")
    assert model.connector.mlp[0].bias is None
    features = torch.randn(3, 16, 32)
    tokens = model.connector(features)  # [B, 4 + 3, D]
    assert tokens.shape == (3, 7, model.llm.hidden_size) and model.tokens_per_image == 7
    assert torch.equal(tokens[:, 0], tokens[:, -1]) and torch.equal(tokens[1, 1], model.connector.markers[1])


def test_vit_options_change_the_encoder():
    from polymodal.encoders.vit import VitEncoder, VitEncoderConfig

    def encoder(**options):
        torch.manual_seed(0)  # the same weights each time
        sizes = {key: value for key, value in VIT.items() if key != "kind"}
        return VitEncoder(VitEncoderConfig(**sizes, **options)).eval()

    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        base = encoder()(pixels)
        assert torch.equal(encoder(activation="gelu", layer_norm_eps=1e-5)(pixels), base)  # the defaults
        for options in ({"activation": "gelu_tanh"}, {"layer_norm_eps": 1e-6}):
            assert 0 < (encoder(**options)(pixels) - base).abs().max().item() < 0.1


def test_files_and_config(exported):
    model, directory, _, _ = exported["llama"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "idefics3" and config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert config["scale_factor"] == 2 and config["tie_word_embeddings"] is False
    assert config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert config["vision_config"]["layer_norm_eps"] == 1e-6
    assert config["image_token_id"] == model.llm.image_token_id
    assert json.loads((directory / "processor_config.json").read_text())["image_seq_len"] == 4
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    assert preprocessor["do_image_splitting"] is False and preprocessor["max_image_size"] == {"longest_edge": 32}
    generation = json.loads((directory / "generation_config.json").read_text())
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    marker_ids = [token["id"] for token in tokenizer["added_tokens"] if token["content"] in (AROUND_IMAGE, GLOBAL_IMAGE)]
    assert set(marker_ids) <= set(generation["suppress_tokens"])
    card = (directory / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "transformers"


# ---------------------------------------------------------------- refusals and atomicity


@pytest.mark.parametrize(("encoder", "connector", "named"), [
    ({"kind": "cnn", "image_size": 32, "channels": [8, 16, 16, 24]}, SHUFFLE, "model.encoders.image: kind 'cnn'"),
    (VIT, {"kind": "mlp"}, "model.connectors.image: kind 'mlp'"),
    (VIT, {**SHUFFLE, "depth": 2}, "model.connectors.image.depth"),
    (VIT, {**SHUFFLE, "bias": True}, "model.connectors.image.bias"),
    (VIT, {**SHUFFLE, "markers": False}, "model.connectors.image.markers"),
    ({**VIT, "image_size": 38, "patch_size": 2}, {**SHUFFLE, "factor": 1}, "model.encoders.image.image_size"),
])
def test_unexportable_composition_is_refused_in_one_line(tmp_path, capsys, encoder, connector, named):
    error = export_proofs.refused_export(tmp_path, capsys, encoder, connector, "smolvlm")
    assert error.startswith(f"polymodal: error: {named}")


def test_a_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    export_proofs.failed_export_leaves_nothing(build("llama"), "smolvlm", idefics3_module, tmp_path, monkeypatch)
