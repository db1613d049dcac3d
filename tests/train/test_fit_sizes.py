"""Encoder sizes fitted from the training data before the model is built (issue 19 §3):
recipes/basicmotions.yaml with only the set's name changed gets each set's channels,
length and, from that length, PatchTST's patch length and stride."""

import pytest

from conftest import RECIPES, needs_package
from polymodal.config import load_recipe
from polymodal.train.fit_sizes import fit_encoder_sizes

pytestmark = needs_package("aeon")


@pytest.mark.parametrize(("name", "sizes"), [
    ("BasicMotions", (6, 100, 16, 8)),  # 12 patches of 16: the recipe's measured setting kept
    ("JapaneseVowels", (12, 26, 4, 2)),  # 3 patches of 16 would be too few: 12 of 4
])
def test_the_basicmotions_recipe_fits_sizes_and_patches_to_the_set(name, sizes):
    recipe = load_recipe(f"{RECIPES}/basicmotions.yaml", [f"stages.0.data.0.name={name}"])
    fit_encoder_sizes(recipe)
    encoder = recipe.model.encoders["series"]
    assert (encoder.channels, encoder.length, encoder.patch_len, encoder.stride) == sizes
