"""The tiny recipe's golden run: a refactor that moves both sides of an equivalence test
together still changes these numbers. How to regenerate: tests/golden/tiny_run.py."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import tiny_run


def test_the_tiny_recipe_trains_and_answers_as_recorded():
    expected = json.loads(tiny_run.GOLDEN.read_text())
    got = tiny_run.run()
    for stage, losses in expected["losses"].items():
        assert got["losses"][stage] == pytest.approx(losses, rel=1e-4, abs=1e-5), stage
    assert got["answers"] == expected["answers"]
