"""recipes/basicmotions.yaml trains and evaluates, and so does any other aeon classification
set put in its place by name alone (issue 19 §3): its sizes come from the data. The real
LLM is swapped for tiny:llama and the stage cut to two steps: the path is the point."""

import json

import pytest

from conftest import RECIPES, needs_package
from polymodal.cli.main import main
from polymodal.config import load_recipe
from polymodal.train.run import train

pytestmark = needs_package("aeon")
FAST = ["model.llm.source=tiny:llama", "stages.0.steps=2", "stages.0.batch_size=4"]


@pytest.mark.parametrize(("name", "channels", "length", "classes"), [
    ("BasicMotions", 6, 100, 4),
    ("PickupGestureWiimoteZ", 1, 361, 10),
])
def test_the_recipe_trains_and_evaluates_any_bundled_set_by_name(tmp_path, capsys, name, channels, length, classes):
    recipe = load_recipe(f"{RECIPES}/basicmotions.yaml", [*FAST, f"stages.0.data.0.name={name}"])
    train(recipe, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model"]
    encoder = saved["encoders"]["series"]
    assert (encoder["kind"], encoder["channels"], encoder["length"]) == ("patchtst", channels, length)
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "run" / "model"), "--task", "series-classification",
                 "--data", f"aeon:{name}", "--limit", "4", "--out", str(tmp_path / "eval")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["classes"] == classes
    assert 0.0 <= result["accuracy"] <= 1.0
