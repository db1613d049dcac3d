"""`compile: true` on a stage: the decoder layers train through torch.compile to the loss the
eager layers reach, and are eager again afterwards."""

import pytest
from test_train import recipe, synthetic_dataset

from polymodal.model import MultimodalLM
from polymodal.train.compiled import compile_layers, uncompile
from polymodal.train.run import train


def test_a_compiled_stage_trains_to_the_eager_loss_and_leaves_the_layers_eager(tmp_path, monkeypatch):
    from polymodal.train import loop

    path = synthetic_dataset(tmp_path)
    compiled_models = []
    real_compile = loop.compile_layers

    def record(model):
        compiled_models.append(model)
        return real_compile(model)

    monkeypatch.setattr(loop, "compile_layers", record)
    losses = {flag: train(recipe(path, ["connector", "llm"], steps=4, compile=flag), tmp_path / str(flag))
              for flag in (False, True)}
    assert len(compiled_models) == 1  # only the stage that asks
    # Inductor fuses and reorders float32 sums: the same training within rounding
    assert losses[True]["final_loss"] == pytest.approx(losses[False]["final_loss"], rel=1e-3)
    layers = compiled_models[0].decoder_layers()
    assert layers and all(layer._compiled_call_impl is None for layer in layers)  # eager after the stage


def test_compile_layers_covers_every_decoder_layer_and_uncompile_undoes_it():
    from conftest import tiny_model

    model = tiny_model(llm={"source": "tiny:llama"})
    assert isinstance(model, MultimodalLM)
    assert compile_layers(model) == len(model.llm.model.get_decoder().layers) > 0
    assert all(layer._compiled_call_impl is not None for layer in model.decoder_layers())
    uncompile(model)
    assert all(layer._compiled_call_impl is None for layer in model.decoder_layers())
