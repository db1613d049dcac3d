"""`precision: auto`: bfloat16 where the device computes it natively, float32 elsewhere,
and the run's summary says which it picked."""

import pytest
import torch
from test_train import recipe, synthetic_dataset

from polymodal.config import RecipeConfig, from_dict
from polymodal.errors import ConfigError
from polymodal.train import precision
from polymodal.train.precision import choose_precision
from polymodal.train.run import train

CPU = torch.device("cpu")


def test_auto_picks_bfloat16_on_a_cpu_with_bfloat16_instructions():
    assert choose_precision("auto", CPU, {"avx2", "avx512f", "avx512_bf16"}) == (
        "bfloat16", "auto: CPU has avx512_bf16")
    assert choose_precision("auto", CPU, {"avx2", "amx_bf16", "amx_tile"})[0] == "bfloat16"


def test_auto_picks_float32_on_an_avx2_only_cpu():
    chosen, why = choose_precision("auto", CPU, {"sse4_2", "avx", "avx2", "fma"})
    assert chosen == "float32" and "no bfloat16 instructions" in why


def test_auto_on_cuda_follows_torch(monkeypatch):
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert choose_precision("auto", torch.device("cuda"))[0] == expected


def test_an_explicit_precision_is_kept_whatever_the_cpu():
    assert choose_precision("bfloat16", CPU, set()) == ("bfloat16", "set in the recipe")
    assert choose_precision("float32", CPU, {"avx512_bf16"}) == ("float32", "set in the recipe")


def test_cpu_flags_reads_the_flags_line(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre_v1\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.cpu_flags() == {"fpu", "avx2", "avx512_bf16"}


def test_config_accepts_auto_and_names_the_field_for_anything_else(tmp_path):
    stage = recipe(tmp_path / "data.json", ["connector"], steps=1, precision="auto").stages[0]
    assert stage.precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        from_dict(RecipeConfig, {"name": "x", "model": {"llm": {"source": "tiny:llama"}}, "stages": [
            {"name": "a", "train": ["llm"], "lr": {"llm": 1e-3}, "precision": "fp8",
             "data": [{"format": "easy-vqa"}]}]})


@pytest.mark.parametrize("flags, expected", [({"avx2"}, "float32"), ({"avx2", "avx512_bf16"}, "bfloat16")])
def test_the_summary_records_what_auto_picked(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    path = synthetic_dataset(tmp_path)
    summary = train(recipe(path, ["connector"], steps=2, precision="auto"), tmp_path / "run")
    assert summary["stages"]["only"]["precision"] == expected
    assert summary["stages"]["only"]["precision_reason"].startswith("auto: CPU")


def test_bfloat16_training_loss_stays_close_to_float32(tmp_path):
    """Autocast keeps the weights and optimizer in float32: a few steps in bfloat16 end at
    nearly float32's loss (a broken cast, e.g. bfloat16 master weights, drifts far more)."""
    path = synthetic_dataset(tmp_path)
    losses = {p: train(recipe(path, ["connector", "llm"], steps=15, precision=p), tmp_path / p)["final_loss"]
              for p in ("float32", "bfloat16")}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
