"""Every encoder x connector on tiny models: shapes forward and backward, and where gradients go."""

import pytest
import torch

from conftest import image, tiny_model
from polymodal.errors import ConfigError
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate

ENCODERS = {
    "clip": {"kind": "hf", "source": "tiny:clip", "layer": -2},
    "siglip": {"kind": "hf", "source": "tiny:siglip", "layer": -1},
    "dinov2": {"kind": "hf", "source": "tiny:dinov2"},
    "vit": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
    "patches": {"kind": "patches", "image_size": 32, "patch_size": 8},
    "cnn": {"kind": "cnn", "image_size": 32, "channels": [8, 16, 16, 24]},
    "multi": {"kind": "multi", "parts": [{"kind": "hf", "source": "tiny:clip"},
                                         {"kind": "hf", "source": "tiny:dinov2"}]},
}
# Each connector with the token count it must give for a 4x4 grid of 16 encoder tokens.
CONNECTORS = {
    "linear": ({"kind": "linear"}, 16),
    "mlp": ({"kind": "mlp", "depth": 2}, 16),
    "pixel_shuffle": ({"kind": "pixel_shuffle", "factor": 2}, 4),
    "perceiver": ({"kind": "perceiver", "num_latents": 5, "depth": 1, "heads": 2}, 5),
    "qformer": ({"kind": "qformer", "num_queries": 3, "depth": 2, "heads": 2, "width": 16,
                 "cross_attention_every": 2}, 3),
    "cabstractor": ({"kind": "cabstractor", "num_tokens": 4, "depth": 1}, 4),
}


def two_image_batch(model):
    """Two samples: one image in the first turn; two images, one in a later turn."""
    first = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "a cat"}]
    second = [{"role": "user", "content": "<image>Look."}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": "And <image>?"}, {"role": "assistant", "content": "a dog"}]
    samples = [model.processor.encode_for_training(first, [image(1)]),
               model.processor.encode_for_training(second, [image(2), image(3)])]
    return collate(samples, model.pad_id)


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_shapes_and_gradients(encoder, connector):
    config, tokens = CONNECTORS[connector]
    model = tiny_model(ENCODERS[encoder], config)
    model.set_trainable(["connector"])
    assert model.tokens_per_image == tokens
    pixels = torch.stack([image(i) for i in range(3)])
    features = model.encoder(pixels)
    assert features.shape == (3, 16, model.encoder.out_dim)
    assert model.connector(features).shape == (3, tokens, model.llm.hidden_size)

    batch = two_image_batch(model)
    assert int((batch.input_ids == model.llm.image_token_id).sum()) == 3 * tokens
    model.train()
    loss = next_token_loss(model(batch))
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        reached = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        if name.startswith("connectors.image."):
            assert parameter.grad is not None, f"{name} got no gradient"
        else:
            assert not reached, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.connector.parameters())


def test_lora_trains_only_adapters():
    model = tiny_model(ENCODERS["clip"], CONNECTORS["mlp"][0], {"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}})
    model.set_trainable(["connector", "llm.lora"])
    model.train()
    next_token_loss(model(two_image_batch(model))).backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    llm_trained = {name for name in trained if name.startswith("llm.")}
    assert llm_trained and all("lora_" in name for name in llm_trained)
    assert any(name.startswith("connectors.image.") for name in trained)
    assert not any(name.startswith("encoders.image.") for name in trained)


def test_whole_model_trains_end_to_end():
    model = tiny_model(ENCODERS["vit"], CONNECTORS["mlp"][0])
    model.set_trainable(["encoder", "connector", "llm"])
    model.train()
    next_token_loss(model(two_image_batch(model))).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"


def test_cls_token_kept_on_request():
    model = tiny_model({"kind": "hf", "source": "tiny:clip", "keep_cls": True}, {"kind": "linear"})
    assert model.tokens_per_image == 17
    from polymodal.errors import ConfigError
    with pytest.raises(ConfigError, match="square grid"):
        tiny_model({"kind": "hf", "source": "tiny:clip", "keep_cls": True}, {"kind": "pixel_shuffle"})
    with pytest.raises(ConfigError, match="no CLS token"):
        tiny_model({"kind": "hf", "source": "tiny:siglip", "keep_cls": True}, {"kind": "linear"})


def test_cnn_pool_max_pools_the_grid_to_fewer_tokens():
    model = tiny_model({**ENCODERS["cnn"], "pool": 2}, CONNECTORS["mlp"][0])
    pixels = torch.stack([image(i) for i in range(2)])
    full = tiny_model(ENCODERS["cnn"], CONNECTORS["mlp"][0]).encoder(pixels)  # [2, 16, C], a 4x4 grid
    pooled = model.encoder(pixels)
    assert model.tokens_per_image == 4 and pooled.shape == (2, 4, full.shape[-1])
    grid = full.view(2, 4, 4, -1)
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].amax((1, 2)))  # top-left 2x2 block
    with pytest.raises(ConfigError, match=r"encoders\.image\.pool"):
        tiny_model({**ENCODERS["cnn"], "pool": 5})


def test_mlp_norm_reads_each_token_by_its_shape_not_its_offset_or_scale():
    """`norm: true`: a LayerNorm before the MLP, so a token's common offset and scale (all of
    a ReLU CNN's features are positive) no longer swamp what tells tokens apart."""
    normed = tiny_model(ENCODERS["cnn"], {"kind": "mlp", "depth": 2, "norm": True}).connector
    plain = tiny_model(ENCODERS["cnn"], {"kind": "mlp", "depth": 2}).connector
    features = torch.rand(2, 16, 24)  # [B, S, C]
    shifted = 3 * features + 5
    with torch.no_grad():
        torch.testing.assert_close(normed(shifted), normed(features), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(plain(shifted), plain(features), atol=1e-2)
    assert list(plain.state_dict()) == [k for k in normed.state_dict() if not k.startswith("norm.")]
