"""`polymodal export --format smolvlm`: plain transformers (in a subprocess that never imports
polymodal) loads the Idefics3 export with no missing or unexpected keys and gives polymodal's
prompt (the marker tokens where polymodal's connector puts its markers), pixels, logits
(within 1e-4) and greedy answers; export then import gives the same logits again; the parts
that differ from Idefics3's (pixel-shuffle channel order, positions, bias, markers) are
checked one by one; refusals are one line; a failed export leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from plain_transformers import run_plain

from conftest import tiny_model
from polymodal.cli.main import main
from polymodal.connectors.pixel_shuffle import space_to_depth
from polymodal.interop import export_model
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
QUESTION = "\nWhat shape is in the image?"
NEW_TOKENS = 8


def build(name: str):
    encoder, connector, llm = COMPOSITIONS[name]
    model = tiny_model(encoder, connector, llm)
    if llm.get("lora"):  # peft starts B at zero: give the adapters a real delta to merge
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def messages(image=None) -> list[dict]:
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each composition built, exported, and run by plain transformers in one subprocess:
    name -> (model, export directory, plain-transformers result, image); the image needs
    resizing (70x45 to the encoder's 32x32)."""
    work = tmp_path_factory.mktemp("idefics3")
    image = work / "image.png"
    Image.fromarray((np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)).save(image)
    models, runs = {}, []
    for name in COMPOSITIONS:
        models[name] = build(name)
        export_model(models[name], "smolvlm", work / name)
        runs.append({"name": name, "directory": str(work / name), "image": str(image),
                     "messages": messages(), "max_new_tokens": NEW_TOKENS})
    results = run_plain("image_text_to_text", runs, work / "plain")
    return {name: (models[name], work / name, results[name], image) for name in COMPOSITIONS}


def polymodal_side(model, image):
    """(prompt ids, logits [T, V], greedy answer ids) as polymodal computes them."""
    from polymodal.engine.generate import Engine
    from polymodal.engine.sampling import SamplingParams

    prompt = model.processor.encode(messages(str(image)))
    with torch.no_grad():
        embeds = model.embed(torch.tensor([prompt["input_ids"]]), prompt["media"])
        hidden = model.llm.decoder(inputs_embeds=embeds).last_hidden_state
        logits = model.llm.lm_head(hidden)[0]
    [answer] = Engine(model).generate([{"messages": messages(str(image))}],
                                      SamplingParams(max_new_tokens=NEW_TOKENS))
    return prompt["input_ids"], logits, answer.token_ids


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


def recipe(tmp_path, encoder: dict, connector: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"llm": {"source": "tiny:llama"}, "encoder": encoder,
                                                            "connector": connector}}))
    return str(path)


@pytest.mark.parametrize(("encoder", "connector", "named"), [
    ({"kind": "cnn", "image_size": 32, "channels": [8, 16, 16, 24]}, SHUFFLE, "model.encoders.image: kind 'cnn'"),
    (VIT, {"kind": "mlp"}, "model.connectors.image: kind 'mlp'"),
    (VIT, {**SHUFFLE, "depth": 2}, "model.connectors.image.depth"),
    (VIT, {**SHUFFLE, "bias": True}, "model.connectors.image.bias"),
    (VIT, {**SHUFFLE, "markers": False}, "model.connectors.image.markers"),
    ({**VIT, "image_size": 38, "patch_size": 2}, {**SHUFFLE, "factor": 1}, "model.encoders.image.image_size"),
])
def test_unexportable_composition_is_refused_in_one_line(tmp_path, capsys, encoder, connector, named):
    out = tmp_path / "out"
    code = main(["export", recipe(tmp_path, encoder, connector), "--format", "smolvlm", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert error[-1].startswith(f"polymodal: error: {named}")
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    model = build("llama")

    def disk_fails(*args, **kwargs):  # after the tokenizer files are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(idefics3_module, "write_safetensors", disk_fails)
    with pytest.raises(OSError):
        export_model(model, "smolvlm", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
