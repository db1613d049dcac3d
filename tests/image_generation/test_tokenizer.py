"""The image tokenizer (encoders/image_tokenizer.py) and the `image-tokens` encoder kind
(encoders/image_tokens.py), issue 17 §1 and §2's reading: shapes, the codes' round trip,
errors that name the size, the encoder built, saved and loaded, and trained in a recipe."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import synthetic_dataset

from polymodal.config import ImageTokenizerConfig, ModelConfig, RecipeConfig, from_dict
from polymodal.encoders.image_tokenizer import ImageTokenizer
from polymodal.errors import ConfigError, UserError
from polymodal.model import MultimodalLM

TINY = {"image_size": 16, "downsample": 4, "levels": [5, 5, 5], "channels": [8, 8]}  # K = 16 codes of 125


def tokenizer(**options) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(**{**TINY, **options})).eval()


def pixels(count: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_sizes_of_an_fsq_tokenizer():
    model = tokenizer()
    assert (model.codebook_size, model.num_codes, model.latent_dim, model.image_size) == (125, 16, 3, 16)
    images = pixels()
    codes = model.encode(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 125
    assert model.encode_latents(images).shape == (3, 16, 3)
    with torch.no_grad():
        decoded = model.decode(codes)
    assert decoded.shape == (3, 3, 16, 16) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    reconstruction, forward_codes = model(images)
    assert reconstruction.shape == (3, 3, 16, 16) and torch.equal(forward_codes, codes)
    # the defaults: 64x64 in 8x8 cells, 64 codes of 8*5*5*5 = 1000
    default = ImageTokenizer(ImageTokenizerConfig())
    assert (default.codebook_size, default.num_codes, default.latent_dim) == (1000, 64, 4)


def test_codes_round_trip_through_the_levels_and_are_deterministic_per_image():
    model = tokenizer()
    images = pixels(4)
    codes = model.encode(images)
    latents = model.encode_latents(images)  # the levels' values: the codes, as floats
    assert torch.equal(model.quantizer.indices_to_codes(codes), latents)
    with torch.no_grad():
        assert torch.allclose(model.decode(codes), model.decode_latents(latents))
        assert torch.allclose(model(images)[0], model.decode(codes))
    assert torch.equal(model.encode(images), codes)  # deterministic
    assert torch.equal(model.encode(images[1:2]), codes[1:2])  # an image's codes do not depend on its batch
    # every level's value is one of the grid's: 5 levels per channel
    assert set(latents.flatten().tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}


@pytest.mark.parametrize("kind", ["fsq", "continuous"])
def test_a_1d_tokenizer_gives_global_tokens_each_reading_the_whole_image(kind):
    model = tokenizer(tokens=5, token_width=32, kind=kind, latent_dim=2)
    images = pixels(3)
    latents = model.encode_latents(images)
    assert model.num_codes == 5 and latents.shape == (3, 5, 3 if kind == "fsq" else 2)
    with torch.no_grad():
        assert model.decode_latents(latents).shape == (3, 3, 16, 16)
    corner = images.clone()
    corner[0, :, 0, 0] = 1 - corner[0, :, 0, 0]  # one pixel of the first image changes
    moved = (model.encode_latents(corner) - latents)[0].abs().sum(-1)  # [K]
    if kind == "fsq":
        codes = model.encode(images)
        assert codes.shape == (3, 5) and torch.equal(model.quantizer.indices_to_codes(codes), latents)
        with torch.no_grad():
            assert torch.allclose(model.decode(codes), model(images)[0])
    else:  # one cell's pixel reaches every token (a grid tokenizer's would move one latent)
        assert bool((moved > 0).all())
    with pytest.raises(ConfigError, match="tokens: global codes per image, 1 to 256, got 0"):
        ImageTokenizerConfig(**TINY, tokens=0)


def test_a_continuous_tokenizer_has_bounded_latents_and_no_codes():
    model = tokenizer(kind="continuous", latent_dim=6)
    assert (model.codebook_size, model.latent_dim, model.num_codes) == (0, 6, 16)
    latents = model.encode_latents(pixels())
    assert latents.shape == (3, 16, 6) and float(latents.detach().abs().max()) <= 1
    reconstruction, codes = model(pixels())
    assert codes is None and reconstruction.shape == (3, 3, 16, 16)
    with pytest.raises(UserError, match="continuous image tokenizer has no codes"):
        model.encode(pixels())


def test_wrong_sizes_and_bad_options_are_named():
    model = tokenizer()
    with pytest.raises(UserError, match=r"16x16 pixels \(\[N, 3, 16, 16\]\), got \[2, 3, 32, 32\]"):
        model.encode(pixels(2, 32))
    with pytest.raises(UserError, match="16x16"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"outside \[0, 125\)"):
        model.decode(torch.full((1, 16), 125))
    with pytest.raises(ConfigError, match=r"channels: one conv width per halving \(3 for downsample 8\)"):
        ImageTokenizerConfig(downsample=8, channels=[8, 8])
    with pytest.raises(ConfigError, match="downsample: at least 2"):
        ImageTokenizerConfig(image_size=16, downsample=1, channels=[])


def tokens_model(**encoder) -> dict:
    """tiny:llama reading images through an `image-tokens` encoder (a recipe's `model:`)."""
    return {"llm": {"source": "tiny:llama"}, "encoder": {"kind": "image-tokens", **encoder}, "connector": {"kind": "mlp"}}


def tokens_config(**encoder) -> ModelConfig:
    return from_dict(ModelConfig, tokens_model(**encoder))


def test_the_image_tokens_encoder_embeds_codes_and_saves(tmp_path):
    torch.manual_seed(0)
    model = MultimodalLM(tokens_config(dim=24, **TINY)).eval()
    encoder = model.encoders["image"]
    assert (encoder.num_tokens, encoder.out_dim, encoder.grid, model.tokens_per_image) == (16, 24, (4, 4), 16)
    images = pixels(2)
    features = encoder(images)
    assert torch.equal(features, encoder.embedding(encoder.tokenizer.encode(images)))
    assert model.encode("image", images).shape == (2, 16, 64)  # tiny:llama's width
    model.save_pretrained(tmp_path / "model")
    loaded = MultimodalLM.from_pretrained(tmp_path / "model").eval()
    assert torch.equal(loaded.encoders["image"](images), features)
    # the tokenizer's options given nested are the same tokenizer
    nested = tokens_config(dim=24, tokenizer=TINY).encoders["image"]
    assert nested.tokenizer_config() == tokens_config(dim=24, **TINY).encoders["image"].tokenizer_config()
    with pytest.raises(ConfigError, match="image_size: give the tokenizer's options inline or in tokenizer"):
        tokens_config(image_size=32, tokenizer=TINY)
    with pytest.raises(ConfigError, match="reads discrete codes"):
        tokens_config(tokenizer={**TINY, "kind": "continuous"})


def test_a_recipe_trains_the_tokenizer_then_reads_through_its_codes(tmp_path):
    """Stage 1: objective autoencoder on encoder.image; stage 2: the connector (and the
    codes' embedding) with the next-token loss; the tokenizer is what stage 1 left."""
    path = synthetic_dataset(tmp_path)
    data = [{"format": "llava", "path": str(path)}]
    recipe = from_dict(RecipeConfig, {"name": "tokens", "model": tokens_model(dim=24, **TINY), "stages": [
        {"name": "tokenizer", "objective": "autoencoder", "train": ["encoder.image"], "lr": {"encoder.image": 3e-3},
         "steps": 3, "batch_size": 4, "log_every": 1, "data": data},
        {"name": "read", "train": ["connector"], "lr": {"connector": 3e-3}, "steps": 2, "batch_size": 4,
         "log_every": 1, "data": data}]})
    from polymodal.train.run import train

    summary = train(recipe, tmp_path / "run")
    assert summary["stages"]["tokenizer"]["images"] == 3 * 4 and summary["stages"]["read"]["tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows if "loss" in row] == ["tokenizer"] * 3 + ["read"] * 2
    assert all("images_per_second" in row for row in rows if row.get("stage") == "tokenizer" and "loss" in row)
    model = MultimodalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.encoders["image"].tokenizer.encode(pixels(1)).shape == (1, 16)
