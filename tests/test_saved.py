"""The saved-model format (polymodal.saved) and the one build/load dispatch (polymodal.build):
saved models of format 1 keep loading, and a kind registered elsewhere is built, saved and
loaded through the same path as the built-in ones."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import DATA
from polymodal import registry
from polymodal.build import build_model, load_any, load_model
from polymodal.config import ModelConfig, from_dict, load_recipe
from polymodal.errors import ConfigError, UserError
from polymodal.saved import (
    FORMAT_VERSION,
    load_saved_weights,
    read_model_config,
    upgrade_record,
    write_model_files,
)

SAVED_V1 = Path(DATA) / "saved-v1"


def _value_signature(tensors) -> list[tuple[tuple[int, ...], float]]:
    """(shape, sum) of each distinct tensor: equal weights whatever their names."""
    unique = {(t.data_ptr(), tuple(t.shape)): t for t in tensors}
    return sorted((tuple(t.shape), round(float(t.double().sum()), 4)) for t in unique.values())


@pytest.mark.parametrize("kind, class_name", [("multimodal-lm", "MultimodalLM"),
                                              ("dual-encoder", "DualEncoder")])
def test_a_saved_model_of_format_1_still_loads_with_its_weights(kind, class_name):
    # Written by tests/data/saved-v1/make.py at format 1: renaming a config field or a weight
    # must keep these loading (polymodal.saved.upgrade_record), with every saved value in place.
    model = load_any(str(SAVED_V1 / kind))
    assert type(model).__name__ == class_name and model.config is not None
    saved = _value_signature(load_file(SAVED_V1 / kind / "model.safetensors").values())
    loaded = _value_signature(model.state_dict().values())
    assert all(entry in loaded for entry in saved)


def test_a_newer_format_is_refused():
    with pytest.raises(UserError, match="saved by a newer polymodal"):
        upgrade_record({"format_version": FORMAT_VERSION + 1})


def test_a_saved_model_of_an_unknown_kind_names_its_config(tmp_path):
    shutil.copytree(SAVED_V1 / "multimodal-lm", tmp_path / "model")
    record = json.loads((tmp_path / "model" / "config.json").read_text())
    record["model"]["kind"] = "hologram"
    (tmp_path / "model" / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"config\.json: model\.kind 'hologram' is not a known model kind; "
                                        r"known: dual-encoder, multimodal-lm"):
        load_any(str(tmp_path / "model"))


def test_an_unknown_model_kind_in_a_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^model\.kind: unknown model kind 'clip'; known: dual-encoder, multimodal-lm"):
        from_dict(ModelConfig, {"kind": "clip"}, "model")


# ---------------------------------------------------------------- a kind registered elsewhere


@dataclass
class ProbeConfig(ModelConfig):
    width: int = 3  # an option of this kind alone


class Probe(nn.Module):
    """A model kind of one linear layer, registered by a test."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = config
        self.layer = nn.Linear(config.width, 2)

    @classmethod
    def from_config(cls, config: ProbeConfig) -> "Probe":
        return cls(config)

    def save_pretrained(self, directory) -> None:
        write_model_files(Path(directory), self, self.config, architectures={})

    @classmethod
    def from_pretrained(cls, directory) -> "Probe":
        _, config = read_model_config(Path(directory))
        model = cls(config)
        load_saved_weights(model, Path(directory))
        return model


@pytest.fixture
def probe_kind(monkeypatch):
    registry.discover()
    # A copy of the table for this test: the kind is gone afterwards.
    monkeypatch.setattr(registry.MODEL_KINDS, "_entries", dict(registry.MODEL_KINDS._entries))
    registry.register_model_kind("probe", config=ProbeConfig)(Probe)


def test_a_registered_kind_is_built_saved_and_loaded_through_the_one_dispatch(probe_kind, tmp_path):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("name: probe\nmodel:\n  kind: probe\n  width: 5\n")
    model = load_any(str(recipe))
    assert isinstance(model, Probe) and model.layer.in_features == 5
    assert isinstance(build_model(load_recipe(recipe)), Probe)
    model.save_pretrained(tmp_path / "saved")
    again = load_any(str(tmp_path / "saved"))
    assert isinstance(again, Probe) and isinstance(again.config, ProbeConfig)
    assert torch.equal(again.layer.weight, model.layer.weight)
    assert isinstance(load_model(tmp_path / "saved"), Probe)
    # A recipe that starts from it (init_from) gets the saved model, weights and all.
    (tmp_path / "more.yaml").write_text(f"name: more\ninit_from: {tmp_path / 'saved'}\n")
    started = build_model(load_recipe(tmp_path / "more.yaml"))
    assert isinstance(started, Probe) and torch.equal(started.layer.weight, model.layer.weight)
